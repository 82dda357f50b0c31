"""Attention backends behind one function.

`xla` is the reference (any platform, explicit fp32 softmax); `cudnn` calls
`jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16); `splash` is the TPU
Pallas kernel with segment ids (checked against `xla` in interpret mode on CPU).

Layouts: q `[B, Lq, H, D]`, k/v `[B, Lk, Hkv, D]` (grouped-query: H a multiple of Hkv).
Masks are boolean, True = may attend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BACKENDS = ("xla", "cudnn", "splash")
AUTO = {"tpu": "splash", "gpu": "cudnn"}  # "auto": the fused kernel of the platform, else xla


def resolve_backend(name: str, platform: str | None = None) -> str:
    """`"auto"` -> splash on TPU, cudnn on GPU, xla elsewhere (`platform` defaults to
    `jax.default_backend()`; the planner passes the target chip's); other names unchanged.
    At 8k-token sequences only the fused kernels fit: xla keeps [L, L] scores per head."""
    if name == "auto":
        return AUTO.get(platform or jax.default_backend(), "xla")
    return check_backend(name)

_LANES = 128
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    return name


def _mask5(mask, hkv, g):
    """[B, Lq, Lk] or [B, 1|H, Lq, Lk] -> broadcastable to [B, Hkv, G, Lq, Lk]."""
    if mask.ndim == 3:
        return mask[:, None, None]
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], hkv, g, *mask.shape[-2:])


def _attend(q, k, v, mask, bias, scale, causal_from: int | None):
    """Head-major core: q [B, Hkv, G, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hkv, G, Lq, D].

    Leading batch dimensions and plain matmuls: on CPU this layout is ~3x faster than an
    einsum with the batch axes in the middle. `bias` [B, 1, 1, 1, Lk] carries key padding
    (cheaper than a full mask), `causal_from` the first query row's index for a causal mask
    generated in place.
    """
    b, hkv, g, lq, d = q.shape
    logits = jnp.matmul(q.reshape(b, hkv, g * lq, d), jnp.swapaxes(k, -1, -2),
                        preferred_element_type=jnp.float32)
    logits = logits.reshape(b, hkv, g, lq, -1) * scale
    if bias is not None:
        logits = logits + bias
    if causal_from is not None:
        rows = causal_from + jnp.arange(lq)[:, None]
        logits = jnp.where(rows >= jnp.arange(logits.shape[-1])[None, :], logits, _NEG)
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.matmul(probs.reshape(b, hkv, g * lq, -1), v, preferred_element_type=jnp.float32)
    return out.reshape(b, hkv, g, lq, d)


def xla_attention(
    q, k, v, mask=None, scale: float = 1.0, causal: bool = False, block: int = 128,
    heads_first: bool = False, kv_valid=None,
):
    """Grouped-query attention without repeating k/v; logits and softmax in fp32.

    Layout `[B, L, H, D]`, or `[B, H, L, D]` with `heads_first`. What may be attended is the
    conjunction of `mask` ([B, Lq, Lk] or [B, 1|H, Lq, Lk]), `kv_valid` ([B, Lk] key padding)
    and `causal` (self-attention, query i sees keys <= i). Long queries run in blocks of
    `block` rows: causally a block reads only the keys up to its last row (half the work), and
    the smaller working set is itself ~3x faster on CPU than one [L, L] softmax.
    """
    if not heads_first:
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    if causal and lq != lk:
        raise ValueError("causal attention here is self-attention (Lq == Lk); pass a mask")
    qg = q.reshape(b, hkv, g, lq, d)
    m = None if mask is None else _mask5(mask, hkv, g)
    bias = None
    if kv_valid is not None:
        bias = jnp.where(kv_valid, 0.0, _NEG).astype(jnp.float32)[:, None, None, None, :]
    outs = []
    for st in range(0, lq, block):
        en = min(lq, st + block)
        kend = en if causal else lk
        mb = None if m is None else m[..., st:en, :kend]
        bb = None if bias is None else bias[..., :kend]
        outs.append(_attend(qg[..., st:en, :], k[:, :, :kend], v[:, :, :kend], mb, bb, scale,
                            st if causal else None))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    out = out.reshape(b, h, lq, d).astype(q.dtype)
    return out if heads_first else jnp.swapaxes(out, 1, 2)


def cudnn_attention(q, k, v, mask, scale: float, heads_first: bool = False, kv_valid=None,
                    causal: bool = False, valid_is_prefix: bool = False):
    """cuDNN flash attention. Key padding that is a prefix of each row (`valid_is_prefix`)
    goes in as sequence lengths, the kernel's native padding; any other mask becomes a
    [B, 1, Lq, Lk] bias, the only mask shape cuDNN takes."""
    if heads_first:
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    lq, lk = q.shape[1], k.shape[1]
    lengths = None
    if kv_valid is not None and valid_is_prefix and mask is None and lq == lk:
        # rows with no valid key still get one (their output is discarded by the caller)
        lengths = jnp.maximum(kv_valid.sum(-1), 1).astype(jnp.int32)
        kv_valid = None
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]
    if kv_valid is not None:
        kv = kv_valid[:, None, None, :]
        mask = kv if mask is None else mask & kv
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], 1, lq, lk))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation="cudnn")
    return jnp.swapaxes(out, 1, 2) if heads_first else out


def _splash_kernel(lq: int, lk: int, groups: int, causal: bool, interpret: bool, block: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    base = sm.CausalMask((lq, lk)) if causal else sm.FullMask((lq, lk))
    mask = sm.MultiHeadMask([base] * groups)
    bq, bk = min(block, lq), min(block, lk)
    sizes = sk.BlockSizes(
        block_q=bq, block_kv_compute=bk, block_kv=bk,
        block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
        block_q_dq=bq, block_kv_dq=bk,
    )
    # made afresh in each trace (the mask tables, numpy, are cached by splash's own
    # `process_mask`) and staged as that trace's constants: a kernel cached across traces
    # would need its tables as device arrays made outside them, on the context mesh's
    # devices, which are compile-only when planning for a TPU topology on a CPU host
    return sk.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
    )


def splash_attention(
    q, k, v, q_segment_ids, kv_segment_ids, scale: float, causal: bool,
    interpret: bool = False, block: int = 128, heads_first: bool = False,
):
    """TPU splash kernel. Padding and packing are expressed as segment ids ([B, L] int32):
    a query attends only to keys of the same segment id."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    if not heads_first:
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    b, h, lq0, d = q.shape
    # the kernel tiles keys in multiples of 128 lanes: pad both lengths, with segment ids
    # that keep the padding to itself, and cut the output back
    pq, pk = -lq0 % _LANES, -k.shape[2] % _LANES
    if pq:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, pq), (0, 0)))
        q_segment_ids = jnp.pad(q_segment_ids, ((0, 0), (0, pq)), constant_values=-1)
    if pk:
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pk), (0, 0))) for x in (k, v))
        kv_segment_ids = jnp.pad(kv_segment_ids, ((0, 0), (0, pk)), constant_values=-1)
    lq = lq0 + pq
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv

    def local(q, k, v, qs, ks):
        # one device's rows and heads: per (batch, kv head), q [G, Lq, D], k/v [Lk, D]
        # broadcast to G
        kernel = _splash_kernel(lq, lk, g, causal, interpret, block)
        bl, hl = q.shape[0], k.shape[1]
        qg = (q * scale).reshape(bl, hl, g, lq, d)

        def one(qh, kh, vh, qs, ks):
            kh = jnp.broadcast_to(kh[None], (g, *kh.shape))
            vh = jnp.broadcast_to(vh[None], (g, *vh.shape))
            return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=qs, kv=ks))

        per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
        out = jax.vmap(per_head)(qg, k, v, qs, ks)  # [B, Hkv, G, Lq, D]
        return out.reshape(bl, hl * g, lq, d)

    out = _on_each_device(local, q, k, v, q_segment_ids, kv_segment_ids)
    out = out[:, :, :lq0].astype(q.dtype)
    return out if heads_first else jnp.swapaxes(out, 1, 2)


def _on_each_device(local, q, k, v, q_segment_ids, kv_segment_ids):
    """`local(q, k, v, q_segment_ids, kv_segment_ids)` on each device's rows and heads: a
    Mosaic kernel cannot be partitioned by XLA, so under a context mesh of several devices
    it runs inside `shard_map`, rows split as the rules split 'batch', heads as they split
    'heads' when both the query and the KV heads divide (else every device has all heads),
    whole sequences on each device. q/k/v are [B, H, L, D]."""
    from tempo_jax import sharding as shd

    mesh = shd.active_mesh()
    if mesh is None:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    rules = shd.current_rules()
    rows = shd.logical_to_spec(("batch",), rules, mesh, q.shape[:1])[0]
    heads = shd.logical_to_spec(("heads",), rules, mesh, q.shape[1:2])[0]
    if heads is not None and shd.logical_to_spec(("heads",), rules, mesh, k.shape[1:2])[0] != heads:
        heads = None  # the KV heads do not split as the query heads do
    qkv = P(rows, heads, None, None)
    seg = P(rows, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv,
                         check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def attention(
    q, k, v, *, scale: float, backend: str = "xla", mask=None, kv_valid=None,
    q_segment_ids=None, kv_segment_ids=None, causal: bool = False,
    splash_interpret: bool = False, heads_first: bool = False, valid_is_prefix: bool = False,
):
    """Dispatch to a backend; layout [B, L, H, D], or [B, H, L, D] with `heads_first`.

    Visibility is `mask` & `kv_valid` (key padding, [B, Lk]) & `causal`; `valid_is_prefix`
    promises that each row's valid keys come first (right padding), which cuDNN runs faster.
    `splash` expresses padding and packing as segment ids instead (taken from `kv_valid` when
    not given) and accepts no general mask.
    """
    if backend == "xla":
        return xla_attention(q, k, v, mask, scale, causal=causal, heads_first=heads_first,
                             kv_valid=kv_valid)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, mask, scale, heads_first=heads_first,
                               kv_valid=kv_valid, causal=causal, valid_is_prefix=valid_is_prefix)
    if backend == "splash":
        if mask is not None:
            raise ValueError("the splash backend takes segment ids, not a general mask")
        if q_segment_ids is None and kv_valid is None:  # no padding: one segment
            rows = (q.shape[0], q.shape[2] if heads_first else q.shape[1])
            q_segment_ids = kv_segment_ids = jnp.ones(rows, jnp.int32)
        elif q_segment_ids is None:
            q_segment_ids = kv_segment_ids = kv_valid.astype(jnp.int32)
        return splash_attention(
            q, k, v, q_segment_ids, kv_segment_ids, scale, causal, interpret=splash_interpret,
            heads_first=heads_first,
        )
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
