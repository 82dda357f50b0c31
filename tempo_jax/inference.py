"""Answering a batch of prompts: greedy answers as JSON rows, and the teacher-forced
probability of a refusal. The evaluation during training, `evaluate run` and `predict` all
answer through here, so they agree.

With a mesh (`mesh` given) both run on the global batch of every process, as the rollouts do:
each process passes its own rows (`data.batching.global_batch`), every process runs the same
sharded program, and each gets back the answers of its own rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tempo_jax import sharding as shd
from tempo_jax.data.batching import global_batch
from tempo_jax.data.pipeline import jsonable, model_inputs
from tempo_jax.data.prompts import ENDOFTEXT_ID, EOS_IDS, encode_text, format_answer
from tempo_jax.generate import (
    GenerateOutput,
    SamplingConfig,
    generate_from_inputs,
    generate_global,
)
from tempo_jax.grounding.answers import parse_answer
from tempo_jax.models.positions import decode_start

__all__ = ["answer_rows", "answer_sampling", "refusal_probabilities", "sample_rows"]


def answer_sampling(max_new_tokens: int, **kw) -> SamplingConfig:
    """The sampling settings of an answer in our chat format (its EOS ids, pad after EOS):
    greedy unless `kw` says otherwise (`num_samples`, `temperature`, `top_p`)."""
    return SamplingConfig(max_new_tokens, **{"temperature": 0.0, **kw},
                          eos_token_id=EOS_IDS, pad_token_id=ENDOFTEXT_ID)


def sample_rows(model, batch: dict, mesh, rules=shd.DEFAULT_RULES, *,
                sampling: SamplingConfig, rng=None):
    """`sampling.num_samples` completions of each prompt of this process's left-padded
    `batch`, run as one sharded program on the global batch (every process passes its own
    rows). Returns this process's rows (prompt-major, host arrays) and the batch's model
    inputs as global arrays. PIR-GRPO's rollout and the greedy evaluation on a mesh both
    sample through here."""
    inputs = global_batch(batch, mesh, rules, model_config=model.config, pad_side="left")
    start = shd.shard_rows(decode_start(batch["position_ids"], batch["attention_mask"])
                           .astype(np.int32), mesh, rules)
    with shd.use_mesh(mesh, rules):
        out = generate_global(model, inputs, start, sampling, rng=rng)
    g = sampling.num_samples
    mine = (shd.process_rows(start)[:, None] * g + np.arange(g)).ravel()
    return GenerateOutput(out.tokens[mine], out.logprobs[mine], out.lengths[mine]), inputs


def _greedy(model, batch: dict, max_new_tokens: int, mesh, rules):
    """(tokens, lengths) of this process's rows of a left-padded prompt batch."""
    sampling = answer_sampling(max_new_tokens)
    if mesh is None:
        out = generate_from_inputs(model, model_inputs(batch), sampling)
    else:
        out, _ = sample_rows(model, batch, mesh, rules, sampling=sampling)
    return out.tokens, out.lengths


def answer_rows(model: Any, batches: Iterable[dict], tokenizer: Any, max_new_tokens: int, *,
                mesh=None, rules=shd.DEFAULT_RULES) -> Iterator[list[dict]]:
    """Greedy answers of pipeline batches (prompts, left-padded), one list of JSON rows per
    batch: the batch's metadata, the decoded `answer` and its `parsed` form. With `mesh`,
    every process must pass the same number of batches of the same size (its own rows)."""
    for batch in batches:
        tokens, lengths = _greedy(model, batch, max_new_tokens, mesh, rules)
        rows = []
        for m, t, n in zip(batch["meta"], tokens, lengths, strict=True):
            text = tokenizer.decode(t[:n], skip_special_tokens=True)
            rows.append({**{k: jsonable(v) for k, v in m.items()}, "answer": text,
                         "parsed": jsonable(parse_answer(text))})
        yield rows


def _find(seq: list, sub: list) -> int:
    """Index of the first occurrence of `sub` in `seq`, or -1."""
    n = len(sub)
    return next((i for i in range(len(seq) - n + 1) if seq[i:i + n] == sub), -1)


def refusal_probabilities(model: Any, batches: Iterable[dict], tokenizer: Any,
                          prompt_cfg: Any, *, mesh=None, rules=shd.DEFAULT_RULES
                          ) -> dict[str, float]:
    """P(`none`) where a refusal's answer first differs from a window's (right after
    `<answer`), teacher-forced, for every example of SFT-format batches (prompt + answer,
    right-padded): qid -> probability of this process's rows. Unlike greedy answers, it shows
    how well the model tells irrelevant pairs from relevant ones whatever the threshold."""
    # The tokens just before a refusal's answer first differs from a window's ("answer", ">")
    # mark the decision in each row; with a caption think its offset varies with the caption.
    none = encode_text(tokenizer, format_answer(None, prompt_cfg, "x"))
    window = encode_text(tokenizer, format_answer((1.0, 2.0), prompt_cfg, "x"))
    p = next(i for i, (a, b) in enumerate(zip(none, window, strict=False)) if a != b)
    none_id, mark = none[p], none[max(0, p - 2):p]
    out: dict[str, float] = {}

    @jax.jit
    def prob(state, inputs, pos):
        logits = nnx.merge(graphdef, state).forward(inputs, logits_positions=pos)
        return jax.nn.softmax(logits[:, 0], axis=-1)[:, none_id]

    graphdef, state = nnx.split(model)
    for batch in batches:
        pos = np.zeros((len(batch["meta"]), 1), np.int32)  # the logits predicting the decision
        for i, (ids, mask) in enumerate(zip(batch["input_ids"], batch["loss_mask"],
                                            strict=True)):
            first = int(np.argmax(mask))  # the answer's first token
            at = _find(list(ids[first:]), mark)
            if at < 0:
                raise ValueError(f"{batch['meta'][i]['qid']}: no {tokenizer.decode(mark)!r} in "
                                 "the answer")
            pos[i, 0] = first + at + len(mark) - 1
        if mesh is None:
            probs = np.asarray(prob(state, model_inputs(batch), jnp.asarray(pos)))
        else:
            inputs = global_batch(batch, mesh, rules, model_config=model.config)
            gpos = shd.shard_rows(pos, mesh, rules)
            with shd.use_mesh(mesh, rules):
                got = prob(state, inputs, gpos)
            probs = _local_rows(got, shd.process_rows(gpos))
        for m, q in zip(batch["meta"], probs, strict=True):
            out[str(m["qid"])] = float(q)
    return out


def _local_rows(x: jax.Array, rows: np.ndarray) -> np.ndarray:
    """This process's rows of a global per-row array (its addressable shards)."""
    if x.is_fully_addressable:
        return np.asarray(x)[rows]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))[rows]
