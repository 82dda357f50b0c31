"""Batched sampling with a preallocated KV cache: the decoder behind GRPO rollouts and
evaluation.

One jitted function does everything on the device: the vision tower and the prompt prefill
run once per prompt, the prompt's KV cache is broadcast to the `num_samples` rows that share
it, and the decode loop is a `lax.while_loop` that stops when every row has finished.

Prompts are left-aligned on the host (padding first), so every row's next token goes to the
same cache slot; each row keeps its own M-RoPE offset (the max of its prompt positions + 1),
which is what Qwen2.5-VL's original `rope_deltas` encode. Shapes are bucketed (prompt
length, batch, vision patches) so a dataset compiles a handful of times.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tempo_jax.models import families
from tempo_jax.models.inputs import bucket


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample, as one frozen object (Tunix's `RolloutConfig`): built and checked once,
    then passed whole by `generate`, `inference.sample_rows`, the GRPO rollout and the
    evaluation / `predict`, and taken by the jitted program as one static argument.

    `temperature` 0 is greedy; `top_k` 0 and `top_p` 1 truncate nothing. `eos_token_id` is
    one id or several; `pad_token_id` (what follows EOS) defaults to the first EOS id."""

    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: int | Sequence[int] | None = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if int(self.num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling settings: temperature={self.temperature}, "
                             f"top_p={self.top_p}, top_k={self.top_k}")
        eos = () if self.eos_token_id is None else tuple(
            int(e) for e in np.atleast_1d(self.eos_token_id).tolist())
        pad = self.pad_token_id if self.pad_token_id is not None else (eos[0] if eos else 0)
        for name, value in (("max_new_tokens", int(self.max_new_tokens)),
                            ("num_samples", int(self.num_samples)),
                            ("temperature", float(self.temperature)),
                            ("top_p", float(self.top_p)), ("top_k", int(self.top_k)),
                            ("eos_token_id", eos), ("pad_token_id", int(pad))):
            object.__setattr__(self, name, value)

    @classmethod
    def greedy(cls, max_new_tokens: int, **kw) -> SamplingConfig:
        return cls(max_new_tokens, temperature=0.0, **kw)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    tokens: np.ndarray  # [B * num_samples, max_new_tokens] int32, pad_token_id after EOS
    logprobs: np.ndarray  # [B * num_samples, max_new_tokens] fp32, 0 after EOS
    lengths: np.ndarray  # [B * num_samples] tokens generated, EOS included


def left_align(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray):
    """Move each row's valid tokens to the end (a stable reorder, so vision tokens keep their
    order and the features still scatter onto the right tokens)."""
    order = np.argsort(mask, axis=1, kind="stable")
    rows = np.arange(ids.shape[0])[:, None]
    return ids[rows, order], mask[rows, order], pos[:, rows, order]


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float):
    """Sample one token per row from fp32 logits [R, V] after temperature, top-k and top-p
    truncation; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_l = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_l, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = before < top_p  # the first token is always kept
        cutoff = jnp.min(jnp.where(keep, sorted_l, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return inverse_cdf_sample(logits, rng)


def inverse_cdf_sample(logits, rng, block: int = 256):
    """One token per row from fp32 logits [R, V], by inverse transform: one uniform per row
    instead of `jax.random.categorical`'s Gumbel noise per entry (random bits and two
    logarithms for each of 152k entries, which cost more than a decode step on CPU). The
    cumulative sum runs in two levels (blocks of `block` entries, then within the chosen
    block), so its rounding stays that of a few hundred fp32 additions."""
    r, v = logits.shape
    nb = -(-v // block)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # exp(-inf) = 0
    p = jnp.pad(p, ((0, 0), (0, nb * block - v))).reshape(r, nb, block)
    mass = jnp.sum(p, axis=-1)  # [R, nb]
    upto = jnp.cumsum(mass, axis=-1)
    u = jax.random.uniform(rng, (r, 1), dtype=upto.dtype) * upto[:, -1:]
    b = jnp.minimum(jnp.sum(upto <= u, axis=-1), nb - 1)  # the block holding u
    # `b` may land on an empty block only through rounding at the very top: step back to the
    # last block with mass
    last = nb - 1 - jnp.argmax((mass > 0)[:, ::-1], axis=-1)
    b = jnp.minimum(b, last)
    rows = jnp.arange(r)
    inner = jnp.cumsum(p[rows, b], axis=-1)  # [R, block]
    u_in = u[:, 0] - (upto[rows, b] - mass[rows, b])
    j = jnp.sum(inner <= u_in[:, None], axis=-1)
    # never a zero-probability entry: the last nonzero one of the block at most
    top = block - 1 - jnp.argmax((p[rows, b] > 0)[:, ::-1], axis=-1)
    tok = b * block + jnp.minimum(j, top)
    return tok.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"))
def sampling_program(graphdef, state, inputs, start_pos, rng, *, sampling: SamplingConfig):
    """The jitted sampling program (prefill, then the decode loop) that `generate_global` and
    `generate_from_inputs` run; public so that the planner can compile it ahead of time."""
    max_new_tokens, num_samples = sampling.max_new_tokens, sampling.num_samples
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
    eos_ids, pad_id = sampling.eos_token_id, sampling.pad_token_id
    model = nnx.merge(graphdef, state)
    opts = model.options
    mask = inputs["attention_mask"]
    b, length = mask.shape
    rows = b * num_samples

    x, side = model.embed_for_decoder(inputs)  # side: Qwen3-VL's DeepStack features
    h, kvs = model.model(x, inputs["position_ids"], mask, opts, return_kv=True, side=side)
    first_logits = model.logits_from_hidden(h[:, -1])

    def grow(a):  # [layers, B, L, Hkv, D] -> [layers, B * S, L + max_new, Hkv, D]
        a = jnp.pad(a, ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0)))
        return jnp.repeat(a, num_samples, axis=1)

    caches = tuple(grow(a) for a in kvs)
    kv_valid = jnp.repeat(jnp.pad(mask.astype(bool), ((0, 0), (0, max_new_tokens))),
                          num_samples, axis=0)
    start = jnp.repeat(start_pos, num_samples)
    logits = jnp.repeat(first_logits, num_samples, axis=0)
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(carry):
        t, done = carry[0], carry[3]
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, tokens, logps, done, caches, kv_valid, logits = carry
        tok = sample_logits(logits, jax.random.fold_in(rng, t), temperature, top_k, top_p)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], -1)[:, 0]
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        tokens = tokens.at[:, t].set(tok)
        logps = logps.at[:, t].set(lp)
        done = done | jnp.isin(tok, eos)
        slot = length + t
        kv_valid = kv_valid.at[:, slot].set(True)
        pos = jnp.broadcast_to((start + t)[None, :, None], (3, rows, 1))
        xt = model.model.embed_tokens(tok[:, None]).astype(opts.dtype)
        ht, caches = model.model.decode(xt, pos, caches, slot, kv_valid[:, None, :], opts)
        logits = model.logits_from_hidden(ht[:, 0])
        return t + 1, tokens, logps, done, caches, kv_valid, logits

    carry = (
        jnp.int32(0),
        jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((rows, max_new_tokens), jnp.float32),
        jnp.zeros((rows,), bool),
        caches, kv_valid, logits,
    )
    _, tokens, logps, done, *_ = jax.lax.while_loop(cond, body, carry)
    is_eos = jnp.isin(tokens, eos)
    first_eos = jnp.argmax(is_eos, axis=1)
    lengths = jnp.where(is_eos.any(axis=1), first_eos + 1, max_new_tokens)
    return tokens, logps, lengths


def compilation_count() -> int:
    """How many distinct shapes/settings `generate` has compiled in this process."""
    return sampling_program._cache_size()


def generate(
    model: nnx.Module,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    position_ids=None,
    *,
    sampling: SamplingConfig | None = None,
    rng: jax.Array | None = None,
    max_length: int | None = None,
    bucket_shapes: bool = True,
    **settings,
) -> GenerateOutput:
    """Sample `num_samples` continuations of each prompt (rows prompt-major: row
    `b * num_samples + s` is sample s of prompt b), as `sampling` says, or the keyword
    `settings` that build one (`max_new_tokens=64, temperature=0, eos_token_id=...`).

    `logprobs` are the policy's own log-softmax over the raw logits (no temperature or
    truncation) at each sampled token: GRPO's old log-probabilities. `position_ids`
    ([3, B, L], e.g. ETA's) replace the computed prompt positions; decoding continues at
    each row's max + 1. `max_length` bounds prompt + new tokens (the cache), checked before
    anything compiles.
    """
    sampling = _sampling(sampling, settings)
    inputs = families.prepare_inputs(
        model.config, input_ids, attention_mask, pixel_values, image_grid_thw,
        pixel_values_videos, video_grid_thw, second_per_grid_ts, position_ids,
        bucketed=bucket_shapes,
    )
    return generate_from_inputs(model, inputs, sampling, rng=rng, max_length=max_length,
                                bucket_shapes=bucket_shapes)


def _sampling(sampling: SamplingConfig | None, settings: dict) -> SamplingConfig:
    if sampling is not None and settings:
        raise TypeError(f"pass either sampling= or its settings, not both ({sorted(settings)})")
    return sampling if sampling is not None else SamplingConfig(**settings)


def generate_from_inputs(
    model: nnx.Module,
    inputs: dict,
    sampling: SamplingConfig | None = None,
    *,
    rng: jax.Array | None = None,
    max_length: int | None = None,
    bucket_shapes: bool = True,
    **settings,
) -> GenerateOutput:
    """`generate` on inputs already prepared on the host (`prepare_inputs`, or a batch of
    the data pipeline: input_ids, attention_mask, position_ids and the vision arrays)."""
    sampling = _sampling(sampling, settings)
    cfg = model.config
    inputs = dict(inputs)
    ids, mask, pos = left_align(np.asarray(inputs["input_ids"]),
                                np.asarray(inputs["attention_mask"]),
                                np.asarray(inputs["position_ids"]))
    b, length = ids.shape
    prompt_len = int(mask.sum(axis=1).max())
    limit = max_length or cfg.text.max_position_embeddings
    if prompt_len + sampling.max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens {sampling.max_new_tokens} exceeds "
            f"the cache of {limit} tokens (max_length)"
        )
    start = families.decode_start(families.family_of(model), pos, mask)
    if bucket_shapes:
        lb, bb = bucket(length, 16), 1 << max(0, (b - 1).bit_length())
        pad_l, pad_b = lb - length, bb - b
        ids = np.pad(ids, ((0, pad_b), (pad_l, 0)))
        mask = np.pad(mask, ((0, pad_b), (pad_l, 0)))
        pos = np.pad(pos, ((0, 0), (0, pad_b), (pad_l, 0)), constant_values=1)
        start = np.pad(start, (0, pad_b))
    keep = ("pixel_values", "vision_meta", "num_image_features")
    inputs = {k: inputs[k] for k in keep if k in inputs}
    inputs.update(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
                  position_ids=pos.astype(np.int32))
    out = generate_global(model, inputs, jnp.asarray(start, jnp.int32), sampling, rng=rng)
    n = b * sampling.num_samples  # the rows of the prompts, without the bucket's padding rows
    return GenerateOutput(out.tokens[:n], out.logprobs[:n], out.lengths[:n])


def generate_global(
    model: nnx.Module,
    inputs: dict,
    start,
    sampling: SamplingConfig,
    *,
    rng: jax.Array | None = None,
) -> GenerateOutput:
    """`generate` on left-padded prompts as they are, with no host preparation: host arrays
    (`generate_from_inputs` after its own), or global arrays on the model's mesh
    (`data.batching.global_batch`, `start` = `sharding.shard_rows` of
    `positions.decode_start`).
    On several hosts every process runs the same program, each having passed in only its own
    prompts, and gets every row (prompt-major) back; `sharding.process_rows` says which
    prompts are this process's."""
    from jax.experimental import multihost_utils

    if rng is None:
        rng = jax.random.key(0)
    graphdef, state = nnx.split(model)
    out = sampling_program(graphdef, state, inputs, start, rng, sampling=sampling)
    if not out[0].is_fully_addressable:  # rows on other hosts' devices: gather them
        out = multihost_utils.process_allgather(out, tiled=True)
    return GenerateOutput(*(np.asarray(a) for a in out))
