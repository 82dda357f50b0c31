"""Policy-update step benchmark: the PIR-GRPO loss and its backward pass on the `bench` size,
ours (jit, after warm-up) vs the same loss and backward in PyTorch on the same weights, same
run, CPU.

Rows are prompt + completion sequences (text only); both sides compute logits at the
completion positions only (transformers' `logits_to_keep`), the PPO-clip objective with the
k3 KL term, token-mean aggregation, and gradients for every parameter.

Our side is the trainer's own gradient step, `tempo_jax.training.steps.make_steps(...)
.grpo_grad` (nothing is jitted here), with G = 1: each row is its own prompt, so the
factory's prompt broadcast is the identity and its `completion_logits` (prompt, then
completion, at positions 0 .. L-1, logits at the completion positions) is the same
computation as the PyTorch side's. It also computes the entropy metric the trainer logs, a
log-softmax over the completion logits the PyTorch side does not pay for. The forward alone
is the factory's `ref_logps` (the same forward, no loss).

    python scripts/bench_train_step.py [--rows 8] [--prompt 448] [--completion 64]

The sides run interleaved, `--reps` rounds. Last output line: a JSON object with tokens/s of
each side (medians) and `ratio_vs_reference` (median, min, max over the rounds);
`ratio_vs_reference_scanned` is the same step on the scanned decoder (`model.scan_layers`),
in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench_forward import head_flops, text_flops  # scripts/ is on sys.path as a script
from benchlib import ratio_spread, spread, time_interleaved


def torch_grpo_loss(logps, old, ref, adv, mask, beta: float, eps_low: float = 0.2,
                    eps_high: float = 0.28):
    """The reference PIR-GRPO loss in PyTorch: PPO-clip (asymmetric eps) + beta * k3 KL,
    token mean over `mask`; logps/old/ref [N, T], adv [N]."""
    import torch

    ratio = torch.exp(logps - old)
    a = adv[:, None]
    obj = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    d = ref - logps
    tok = -obj + beta * (torch.exp(d) - d - 1)
    return (tok * mask).sum() / mask.sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=448)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import torch
    from flax import nnx
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import tempo_jax
    from tempo_jax.models.layers import RuntimeOptions
    from tempo_jax.models.qwen2_5_vl import preset
    from tempo_jax.rl import grpo
    from tempo_jax.training.optimizer import make_optimizer
    from tempo_jax.training.steps import make_steps

    torch.set_num_threads(args.threads)
    cfg = preset("bench")
    n, lp, lc = args.rows, args.prompt, args.completion
    seq = lp + lc
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150_000, size=(n, seq))
    old = rng.normal(-3.0, 0.3, size=(n, lc)).astype(np.float32)
    ref = rng.normal(-3.0, 0.3, size=(n, lc)).astype(np.float32)
    adv = rng.normal(0, 1, size=n).astype(np.float32)
    mask = np.ones((n, lc), np.float32)
    gcfg = grpo.GRPOConfig(beta=0.04)

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg.to_hf_dict("float32")))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = tempo_jax.load_pretrained(d, dtype=jnp.float32)
        scanned = tempo_jax.load_pretrained(
            d, dtype=jnp.float32, options=RuntimeOptions(scan_layers=True))
    hf.train()

    pos = np.broadcast_to(np.arange(seq)[None, None], (3, n, seq)).astype(np.int32)
    # the factory's layout of the same rows: prompts [n, lp], completions [n, lc] after them
    prompt_inputs = {"input_ids": ids[:, :lp].astype(np.int32),
                     "attention_mask": np.ones((n, lp), np.int32),
                     "position_ids": np.ascontiguousarray(pos[:, :, :lp])}
    completions = ids[:, lp:].astype(np.int32)
    start = np.full(n, lp, np.int32)
    steps = make_steps(make_optimizer(1e-6, 1, 100, ml_collections.ConfigDict(
        {"grad_clip": 1.0, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0, "fp32_state": True})))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    dev = jax.device_put((prompt_inputs, completions, mask.astype(bool), start, old, ref, adv))

    def step(params):
        return steps.grpo_grad(params, frozen, graphdef, *dev, gcfg, 1)

    # the same step on the scanned decoder (`model.scan_layers`), timed in the same rounds
    s_graphdef, s_params, s_frozen = nnx.split(scanned, nnx.Param, ...)

    def scanned_step(params):
        return steps.grpo_grad(params, s_frozen, s_graphdef, *dev, gcfg, 1)

    def fwd(params):  # the same forward, up to the completion log-probabilities
        return steps.ref_logps(params, frozen, graphdef, *dev[:4], 1)

    t0 = time.perf_counter()
    jax.block_until_ready(step(params))
    compile_s = time.perf_counter() - t0
    jax_loss = float(step(params)[0][0])

    t_ids = torch.as_tensor(ids)
    t_pos = torch.as_tensor(pos, dtype=torch.long)
    t_old, t_ref = torch.as_tensor(old), torch.as_tensor(ref)
    t_adv, t_mask = torch.as_tensor(adv), torch.as_tensor(mask)
    t_tgt = torch.as_tensor(ids[:, lp:])

    def torch_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=t_ids, position_ids=t_pos, logits_to_keep=lc + 1).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), -1).gather(-1, t_tgt[..., None])[..., 0]
        loss = torch_grpo_loss(logps, t_old, t_ref, t_adv, t_mask, gcfg.beta, gcfg.eps_low,
                               gcfg.eps_high)
        loss.backward()
        return float(loss)

    torch_loss = torch_step()
    jax.block_until_ready(scanned_step(s_params))
    times = time_interleaved(
        {"jax": lambda: jax.block_until_ready(step(params)), "torch": torch_step,
         "jax_scanned": lambda: jax.block_until_ready(scanned_step(s_params))},
        args.reps)
    jax_s, torch_s = spread(times["jax"])["median"], spread(times["torch"])["median"]
    # where the time goes: the forward alone, and each framework's plain matmul speed
    jax.block_until_ready(fwd(params))

    def torch_fwd():
        with torch.no_grad():
            hf(input_ids=t_ids, position_ids=t_pos, logits_to_keep=lc + 1)

    mm_n = 2048
    a = jnp.asarray(rng.standard_normal((mm_n, mm_n)), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    ta = torch.randn(mm_n, mm_n)
    parts = time_interleaved({
        "jax_forward": lambda: jax.block_until_ready(fwd(params)),
        "torch_forward": torch_fwd,
        "jax_matmul": lambda: mm(a).block_until_ready(),
        "torch_matmul": lambda: torch.mm(ta, ta)}, max(3, args.reps))
    med = {k: spread(v)["median"] for k, v in parts.items()}
    # forward + backward = 3 forward passes of matmul FLOPs (backward: two per forward one)
    flops = 3 * n * (text_flops(cfg, seq) + lc * head_flops(cfg))
    jax_mm_gflops = 2 * mm_n**3 / med["jax_matmul"] / 1e9
    torch_mm_gflops = 2 * mm_n**3 / med["torch_matmul"] / 1e9
    tokens = n * seq
    res = {
        "rows": n, "tokens_per_step": tokens,
        "jax_s": spread(times["jax"]), "torch_s": spread(times["torch"]),
        "jax_compile_s": round(compile_s, 2),
        "jax_tokens_per_s": round(tokens / jax_s, 1),
        "torch_tokens_per_s": round(tokens / torch_s, 1),
        "ratio_vs_reference": ratio_spread(times["torch"], times["jax"]),
        "ratio_vs_reference_scanned": ratio_spread(times["torch"], times["jax_scanned"]),
        "jax_scanned_s": spread(times["jax_scanned"]),
        "loss_jax": jax_loss, "loss_torch": torch_loss,
        "jax_forward_s": spread(parts["jax_forward"]),
        "torch_forward_s": spread(parts["torch_forward"]),
        "backward_over_forward_jax": round((jax_s - med["jax_forward"]) / med["jax_forward"], 2),
        "backward_over_forward_torch": round((torch_s - med["torch_forward"])
                                             / med["torch_forward"], 2),
        "step_gflop": round(flops / 1e9, 1),
        "jax_gflops": round(flops / jax_s / 1e9, 1),
        "torch_gflops": round(flops / torch_s / 1e9, 1),
        "jax_matmul_gflops": round(jax_mm_gflops, 1),
        "torch_matmul_gflops": round(torch_mm_gflops, 1),
        "jax_fraction_of_jax_matmul": round(flops / jax_s / 1e9 / jax_mm_gflops, 3),
        "torch_fraction_of_torch_matmul": round(flops / torch_s / 1e9 / torch_mm_gflops, 3),
        "threads": args.threads, "backend": jax.default_backend(),
    }
    for k, v in res.items():
        print(f"  {k:20s} {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
