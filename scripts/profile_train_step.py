"""Where the PIR-GRPO update's time goes on CPU: the `bench_train_step.py` workload (bench
size, 8 rows x (448 prompt + 64 completion) tokens, logits at the completions) cut into
pieces, each jitted alone, forward and forward + backward:

- `decoder`: the 12 decoder layers on given hidden states (gradients for their weights);
- `attention` / `mlp`: one layer's attention block and its MLP, alone;
- `embed`: the token embedding lookup (its gradient is a scatter-add into [vocab, hidden]);
- `head`: final norm, LM head at the 64 completion positions, log-softmax, the GRPO loss;
- `step`: the whole loss on one plain forward (a profiling cut like the others: the
  trainer's own jitted step, `training.steps.make_steps(tx).grpo_grad`, is what
  `bench_train_step.py` times).

    python scripts/profile_train_step.py [--reps 3] [--trace]

Prints one line per piece (forward s, forward + backward s, backward / forward) and a JSON
object last. Times are medians of `--reps` calls after a warm-up. `--trace` also profiles one
forward + backward of the whole step with `jax.profiler` (run it with
`XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true` for per-operation events) and prints the time
per kind of XLA operation (library matmuls, transposing copies, broadcasts, ...) and the
slowest operations with what they compute.
"""

from __future__ import annotations

import argparse
import json

from benchlib import spread, time_interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=448)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated pieces")
    ap.add_argument("--trace", action="store_true", help="per-operation profile of the step")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tempo_jax.models.qwen2_5_vl import Qwen25VL, preset
    from tempo_jax.rl import grpo

    cfg = preset("bench")
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
    n, lp, lc = args.rows, args.prompt, args.completion
    seq = lp + lc
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 150_000, size=(n, seq)), jnp.int32)
    pos = jnp.asarray(np.broadcast_to(np.arange(seq)[None, None], (3, n, seq)), jnp.int32)
    at = jnp.asarray(np.broadcast_to(np.arange(lp - 1, seq - 1)[None], (n, lc)), jnp.int32)
    old = jnp.asarray(rng.normal(-3.0, 0.3, size=(n, lc)), jnp.float32)
    ref = jnp.asarray(rng.normal(-3.0, 0.3, size=(n, lc)), jnp.float32)
    adv = jnp.asarray(rng.normal(0, 1, size=n), jnp.float32)
    mask = jnp.ones((n, lc), jnp.float32)
    gcfg = grpo.GRPOConfig(beta=0.04)
    h0 = jnp.asarray(rng.standard_normal((n, seq, cfg.text.hidden_size)), jnp.float32)
    opts = model.options
    graphdef, params = nnx.split(model)
    text = model.model
    cos, sin = text.mrope(pos)

    def decoder(p, h):
        m = nnx.merge(graphdef, p)
        return jnp.sum(m.model(h, pos, None, opts) ** 2) * 1e-6

    def attention(p, h):
        m = nnx.merge(graphdef, p)
        lyr = m.model.layers[0]
        out, _ = lyr.self_attn(lyr.input_layernorm(h), cos, sin, None, opts)
        return jnp.sum(out ** 2) * 1e-6

    def mlp(p, h):
        m = nnx.merge(graphdef, p)
        lyr = m.model.layers[0]
        return jnp.sum(lyr.mlp(lyr.post_attention_layernorm(h), opts.dtype) ** 2) * 1e-6

    def embed(p, h):
        m = nnx.merge(graphdef, p)
        return jnp.sum(m.model.embed_tokens(ids) * h) * 1e-6

    def head(p, h):
        m = nnx.merge(graphdef, p)
        hh = jnp.take_along_axis(m.model.norm(h), at[..., None], axis=1)
        logits = m.logits_from_hidden(hh)
        logps = grpo.sequence_logps(logits, ids[:, lp:])
        return grpo.grpo_loss(logps, old, ref, adv, mask, gcfg)[0]

    def step(p, h):
        m = nnx.merge(graphdef, p)
        logits = m.forward({"input_ids": ids, "attention_mask": jnp.ones((n, seq), jnp.int32),
                            "position_ids": pos}, logits_positions=at)
        logps = grpo.sequence_logps(logits, ids[:, lp:])
        return grpo.grpo_loss(logps, old, ref, adv, mask, gcfg)[0]

    pieces = {"decoder": decoder, "attention": attention, "mlp": mlp, "embed": embed,
              "head": head, "step": step}
    if args.only:
        pieces = {k: v for k, v in pieces.items() if k in args.only.split(",")}
    out = {}
    for name, fn in pieces.items():
        fwd = jax.jit(fn)
        both = jax.jit(jax.value_and_grad(fn))
        jax.block_until_ready(fwd(params, h0))
        jax.block_until_ready(both(params, h0))
        t = time_interleaved({"forward": lambda f=fwd: jax.block_until_ready(f(params, h0)),
                              "forward+backward": lambda f=both: jax.block_until_ready(
                                  f(params, h0))}, args.reps)
        f, fb = spread(t["forward"]), spread(t["forward+backward"])
        out[name] = {"forward_s": f, "forward_backward_s": fb,
                     "backward_over_forward": round((fb["median"] - f["median"])
                                                    / f["median"], 2)}
        print(f"  {name:10s} forward {f['median']:8.3f} s   forward+backward "
              f"{fb['median']:8.3f} s   backward/forward {out[name]['backward_over_forward']}",
              flush=True)
    if args.trace:
        out["trace"] = trace_step(jax.jit(jax.value_and_grad(step)), params, h0)
    print(json.dumps(out))


def trace_step(fn, params, h0, top: int = 12) -> dict:
    """Milliseconds per kind of XLA operation in one call of `fn`, from a jax.profiler trace;
    prints the `top` slowest operations with their source (`op_name` metadata)."""
    import collections
    import glob
    import gzip
    import re
    import tempfile

    import jax

    jax.block_until_ready(fn(params, h0))
    hlo = fn.lower(params, h0).compile().as_text()
    source = {name: f"{shape} {op}" for name, shape, op in re.findall(
        r"%([\w.\-]+) = (\S+) .*?op_name=\"([^\"]+)\"", hlo)}
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn(params, h0))
        events = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in source:
            per_op[e["name"]] += e["dur"] / 1e3

    def kind(name: str) -> str:
        for key in ("ynn_fusion", "xnn_fusion", "dot", "copy", "transpose", "broadcast",
                    "scatter", "reduce", "concatenate"):
            if key in name:
                return key
        return "other"

    kinds: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        kinds[kind(name)] += ms
    total = sum(per_op.values())
    print(f"  traced operations: {total:.0f} ms in all")
    for k, ms in kinds.most_common():
        print(f"    {k:12s} {ms:8.0f} ms  {100 * ms / total:5.1f}%")
    for name, ms in per_op.most_common(top):
        print(f"    {ms:8.1f} ms  {name:26s} {source[name][:90]}")
    return {"total_ms": round(total, 1), "kinds_ms": {k: round(v, 1) for k, v in kinds.items()},
            "slowest": [[n, round(ms, 1), source[n]] for n, ms in per_op.most_common(top)]}


if __name__ == "__main__":
    main()
