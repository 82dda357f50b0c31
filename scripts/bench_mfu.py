"""PIR-GRPO on one accelerator: MFU of the policy-update step and rollout tokens/s, ours vs
transformers PyTorch on the same device, same shapes, in the same run.

The update step is the trainer's own, from `tempo_jax.training.steps.make_steps`: its
`grpo_grad` (the prompt and its video embedded once, broadcast to G completions; logits at
completion positions only), then its `apply` (AdamW from `training.optimizer` with fp32
moments, skipped when non-finite, parameters and optimizer state donated). The vision tower
is frozen (`training.setup.trainable_filter`), as in training; no training step is jitted
here. The rollout is `generate.generate_from_inputs` with G samples per prompt (the sampling
program the trainer's `training.grpo.rollout` runs, here on one device). The reference does
the same work in PyTorch: HF Qwen2.5-VL (SDPA attention, gradient checkpointing when we
remat), the same loss, torch AdamW, and `model.generate(num_return_sequences=G)` for the
rollout.

MFU counts model FLOPs only (remat recomputation excluded): 3x the forward matmuls of the
decoder over every (prompt + completion) row, causal attention at half the square, the LM head
at completion positions, plus one forward of the frozen vision tower per prompt. The peak is
the chip's dense bf16 datasheet figure from the planner's chip table (H100/H200 SXM: 989
TFLOP/s); the run also measures a large bf16 matmul for comparison.

    python scripts/bench_mfu.py --preset 3b                 # on a GPU: both sides
    python scripts/bench_mfu.py --preset bench --grid 2,8,8 --completion 16 --sides jax

Each side runs in its own subprocess (neither framework's allocator sees the other's memory).
Last output line: a JSON object with both sides' step time, MFU, rollout tokens/s and the
ratios `update_ratio_vs_reference` / `rollout_ratio_vs_reference` (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_forward import head_flops, text_flops, vision_flops
from bench_train_step import torch_grpo_loss
from benchlib import median_time


def shapes(args, cfg):
    """Host arrays of one rollout / update batch: B prompts with one video each, G
    completions per prompt. Random tokens and pixels (never zeros)."""
    import numpy as np

    t, h, w = (int(x) for x in args.grid.split(","))
    b, g, lc = args.prompts, args.generations, args.completion
    n_vis = t * h * w // cfg.vision.merge_unit
    rng = np.random.default_rng(0)
    text = rng.integers(0, 150_000, size=(b, args.text))
    half = args.text // 2
    ids = np.concatenate([text[:, :half], np.full((b, 1), cfg.vision_start_token_id),
                          np.full((b, n_vis), cfg.video_token_id),
                          np.full((b, 1), cfg.vision_end_token_id), text[:, half:]], axis=1)
    pixels = rng.standard_normal((b * t * h * w, cfg.vision.patch_dim)).astype(np.float32)
    return {
        "ids": ids.astype(np.int64), "pixels": pixels,
        "grid": np.tile([[t, h, w]], (b, 1)), "second_per_grid": [2.0] * b,
        "completions": rng.integers(0, 150_000, size=(b * g, lc)).astype(np.int32),
        "old": rng.normal(-3.0, 0.3, size=(b * g, lc)).astype(np.float32),
        "ref": rng.normal(-3.0, 0.3, size=(b * g, lc)).astype(np.float32),
        "adv": rng.normal(0, 1, size=b * g).astype(np.float32),
    }


def update_flops(cfg, args, prompt_len: int) -> float:
    """Model FLOPs of one policy update (see the module docstring)."""
    import numpy as np

    from tempo_jax.models.qwen2_5_vl.vision_meta import frame_cu_seqlens, window_index

    t, h, w = (int(x) for x in args.grid.split(","))
    grid = np.asarray([[t, h, w]])
    win = np.diff(window_index(grid, cfg.vision)[1])
    frames = np.diff(frame_cu_seqlens(grid))
    rows = args.prompts * args.generations
    seq = prompt_len + args.completion
    return (3 * rows * (text_flops(cfg, seq) + args.completion * head_flops(cfg))
            + args.prompts * vision_flops(cfg, t * h * w, win, frames))


def _device_info():
    import jax

    d = jax.devices()[0]
    return d.platform, getattr(d, "device_kind", d.platform)


def _peak(kind: str) -> float | None:
    """The dense bf16 peak of the planner's chip table for a `device_kind` ("NVIDIA H100 80GB
    HBM3", "TPU v5p", "TPU v5 lite"), or None for a chip it does not list."""
    from tempo_jax.plan.chips import CHIPS

    kind = kind.lower().replace("v5 lite", "v5e")
    return next((c.bf16_flops for name, c in CHIPS.items() if name in kind), None)


# ---------------------------------------------------------------------------- ours
def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from flax import nnx

    from tempo_jax.generate import generate_from_inputs
    from tempo_jax.models.attention import resolve_backend
    from tempo_jax.models.qwen2_5_vl import Qwen25VL, RuntimeOptions, prepare_inputs, preset
    from tempo_jax.models.qwen2_5_vl import positions as pos_lib
    from tempo_jax.rl import grpo as grpo_lib
    from tempo_jax.training.optimizer import make_optimizer
    from tempo_jax.training.setup import trainable_filter
    from tempo_jax.training.steps import completion_logits, make_steps

    cfg = preset(args.preset)
    dtype = jnp.dtype(args.dtype)
    backend = resolve_backend(args.attention)
    opts = RuntimeOptions(dtype=dtype, attention_backend=backend, remat=args.remat)
    t0 = time.perf_counter()
    model = Qwen25VL(cfg, param_dtype=dtype, options=opts, rngs=nnx.Rngs(0))
    c = ml_collections.ConfigDict({"model": {"freeze_vision": True}})
    graphdef, params, frozen = nnx.split(model, trainable_filter(c), ...)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    n_train = sum(x.size for x in jax.tree.leaves(params))
    n_all = n_train + sum(x.size for x in jax.tree.leaves(frozen))
    print(f"[jax] {args.preset}: {n_all / 1e9:.3f}B parameters ({n_train / 1e9:.3f}B trained), "
          f"attention {backend}, remat {args.remat}, init {init_s:.1f}s", flush=True)

    s = shapes(args, cfg)
    inputs = prepare_inputs(cfg, s["ids"], pixel_values_videos=s["pixels"].astype(dtype),
                            video_grid_thw=s["grid"], second_per_grid_ts=s["second_per_grid"])
    prompt_len = s["ids"].shape[1]
    g = args.generations
    start = np.repeat(pos_lib.decode_start(np.asarray(inputs["position_ids"]),
                                           np.asarray(inputs["attention_mask"])), g)
    comp_mask = np.ones_like(s["completions"], bool)
    gcfg = grpo_lib.GRPOConfig(num_generations=g, beta=0.04)
    steps = make_steps(make_optimizer(1e-6, 1, 100, ml_collections.ConfigDict(
        {"grad_clip": 1.0, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0, "fp32_state": True})))
    opt_state = steps.tx.init(params)
    dev = jax.device_put((inputs, s["completions"], comp_mask, start, s["old"], s["ref"],
                          s["adv"]))

    def step(state):
        params, opt_state = state
        (loss, _), grads = steps.grpo_grad(params, frozen, graphdef, *dev, gcfg, g)
        params, opt_state, ok = steps.apply(params, opt_state, grads, loss)
        return params, opt_state, ok

    state = [params, opt_state]
    t0 = time.perf_counter()
    *state, ok = step(state)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0

    def timed():
        nonlocal state
        *state, ok = step(state)
        jax.block_until_ready(ok)
        assert bool(ok), "non-finite loss or gradient in the benchmark step"

    step_s = median_time(timed, args.reps)
    stats = jax.devices()[0].memory_stats() or {}
    flops = update_flops(cfg, args, prompt_len)
    out = {"update_s": step_s, "update_compile_s": compile_s, "model_tflop": flops / 1e12,
           "prompt_len": prompt_len, "rows": args.prompts * g,
           "tokens_per_update": args.prompts * g * (prompt_len + args.completion),
           "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
           "params_b": n_all / 1e9, "attention": backend}
    print(f"[jax] update step {step_s:.3f}s (compile {compile_s:.0f}s), "
          f"{flops / step_s / 1e12:.1f} TFLOP/s, peak memory {out['peak_mem_gib']:.1f} GiB",
          flush=True)

    # rollout: the trainer's call (one prompt batch, G samples each, sampling at T=1)
    params = state[0]
    del state, opt_state
    model = nnx.merge(graphdef, params, frozen)

    def rollout(seed):
        o = generate_from_inputs(model, inputs, max_new_tokens=args.completion,
                                 temperature=1.0, num_samples=g, rng=jax.random.PRNGKey(seed),
                                 eos_token_id=None, pad_token_id=0, bucket_shapes=False)
        return int(o.lengths.sum())

    t0 = time.perf_counter()
    rollout(0)
    out["rollout_compile_s"] = time.perf_counter() - t0
    tokens = []
    out["rollout_s"] = median_time(lambda: tokens.append(rollout(len(tokens) + 1)), args.reps)
    out["rollout_tokens"] = tokens[-1]
    print(f"[jax] rollout {out['rollout_tokens']} tokens in {out['rollout_s']:.3f}s "
          f"(compile {out['rollout_compile_s']:.0f}s)", flush=True)

    if args.check:  # fused attention vs the plain XLA reference on this device
        xopts = RuntimeOptions(dtype=dtype, attention_backend="xla", remat="none")
        m2 = nnx.merge(graphdef, params, frozen)
        m2.options = xopts
        one = jax.tree.map(lambda a: a[:1] if getattr(a, "ndim", 0) and a.shape[0] == len(
            s["completions"]) else a, (s["completions"], comp_mask, start))

        def logits(m):
            return np.asarray(completion_logits(m, inputs, *one, 1), np.float32)

        a, b = logits(model), logits(m2)
        out["check_rel_err"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        print(f"[jax] {backend} vs xla attention logits: relative error "
              f"{out['check_rel_err']:.2e}", flush=True)

    n = 8192
    x = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    mm = jax.jit(lambda a: a @ a)
    mm(x).block_until_ready()
    out["matmul_tflops"] = 2 * n**3 / median_time(lambda: mm(x).block_until_ready(), 10) / 1e12
    out["platform"], out["device_kind"] = _device_info()
    return out


# ---------------------------------------------------------------------------- reference
def run_torch(args) -> dict:
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tempo_jax.models.qwen2_5_vl import prepare_inputs, preset

    cfg = preset(args.preset)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    hcfg = Qwen2_5_VLConfig(**cfg.to_hf_dict(torch_dtype=args.dtype))
    hcfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    with torch.device(dev):
        hf = Qwen2_5_VLForConditionalGeneration(hcfg).to(dtype)
    hf.model.visual.requires_grad_(False)
    if args.remat != "none":
        hf.gradient_checkpointing_enable()
    hf.train()
    print(f"[torch] {args.preset} on {dev}, init {time.perf_counter() - t0:.1f}s", flush=True)

    s = shapes(args, cfg)
    inputs = prepare_inputs(cfg, s["ids"], video_grid_thw=s["grid"],
                            second_per_grid_ts=s["second_per_grid"])
    T = lambda a, dt=None: torch.as_tensor(np.asarray(a), device=dev, dtype=dt)  # noqa: E731
    ids, grid = T(s["ids"]), T(s["grid"])
    pixels = T(s["pixels"], dtype)
    ppos = T(inputs["position_ids"], torch.long)
    g, lc, lp = args.generations, args.completion, s["ids"].shape[1]
    comp = T(s["completions"], torch.long)
    old, ref, adv = T(s["old"]), T(s["ref"]), T(s["adv"])
    start = ppos.amax(dim=(0, 2)) + 1
    cpos = (start[:, None] + torch.arange(lc, device=dev)[None]).repeat_interleave(g, 0)
    pos = torch.cat([ppos.repeat_interleave(g, 1), cpos[None].expand(3, -1, -1)], dim=2)
    lm = hf.model.language_model
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-6,
                            weight_decay=0.0, fused=dev == "cuda")

    def loss_fn():
        with torch.no_grad():
            vis = hf.model.visual(pixels, grid_thw=grid)
            vis = getattr(vis, "pooler_output", vis)
            vis = vis[0] if isinstance(vis, (tuple, list)) else vis
        emb = lm.embed_tokens(ids)
        emb = emb.masked_scatter((ids == cfg.video_token_id)[..., None].expand_as(emb),
                                 vis.to(emb.dtype))
        x = torch.cat([emb.repeat_interleave(g, 0), lm.embed_tokens(comp)], dim=1)
        h = lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
        h = h[:, lp - 1:lp - 1 + lc]
        logp = torch.log_softmax(hf.lm_head(h).float(), -1)
        logp = logp.gather(-1, comp[..., None])[..., 0]
        return torch_grpo_loss(logp, old, ref, adv, torch.ones_like(logp), beta=0.04)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    out = {"first_update_s": time.perf_counter() - t0}

    def timed():
        step()
        sync()

    out["update_s"] = median_time(timed, args.reps)
    if dev == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"[torch] update step {out['update_s']:.3f}s", flush=True)

    opt.zero_grad(set_to_none=True)
    opt.state.clear()  # free the moments before the rollout
    hf.eval()
    gen_kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values_videos=pixels, video_grid_thw=grid,
                  second_per_grid_ts=T(s["second_per_grid"]), do_sample=True,
                  temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=g,
                  max_new_tokens=lc, min_new_tokens=lc, pad_token_id=0)

    def rollout():
        with torch.no_grad():
            o = hf.generate(**gen_kw)
        sync()
        return int((o.shape[1] - lp) * o.shape[0])

    rollout()
    tokens = []
    out["rollout_s"] = median_time(lambda: tokens.append(rollout()), args.reps)
    out["rollout_tokens"] = tokens[-1]
    print(f"[torch] rollout {out['rollout_tokens']} tokens in {out['rollout_s']:.3f}s",
          flush=True)
    return out


# ---------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="3b", help="model size: tiny, bench, 3b, 7b")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per step (B)")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--grid", default="32,16,28",
                    help="video grid t,h,w in patches (default: 3584 video tokens, the 3b "
                    "config's SAA budget)")
    ap.add_argument("--text", type=int, default=160, help="text tokens around the video")
    ap.add_argument("--completion", type=int, default=256, help="completion tokens (T)")
    ap.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sides", default="jax,torch")
    ap.add_argument("--check", action="store_true",
                    help="also compare the fused attention's logits with the xla backend")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side:  # a child: run one side, print its JSON last
        res = run_jax(args) if args.side == "jax" else run_torch(args)
        print(json.dumps(res), flush=True)
        return

    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get(
        "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"))
    res = {}
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.strip().splitlines()
        for line in lines[:-1]:
            print(line)
        if proc.returncode or not lines:
            print(f"{side} side failed (exit {proc.returncode})"
                  + (f": {lines[-1]}" if lines else ""), flush=True)
            continue
        res[side] = json.loads(lines[-1])

    out = {"preset": args.preset, "prompts": args.prompts, "generations": args.generations,
           "grid": args.grid, "completion": args.completion, "remat": args.remat}
    if "jax" in res:
        j = res["jax"]
        peak = _peak(j["device_kind"]) or j["matmul_tflops"] * 1e12
        out.update(device=j["device_kind"], attention=j["attention"],
                   params_b=round(j["params_b"], 3), prompt_len=j["prompt_len"],
                   tokens_per_update=j["tokens_per_update"],
                   model_tflop_per_update=round(j["model_tflop"], 1),
                   update_s=round(j["update_s"], 4),
                   update_tflops=round(j["model_tflop"] / j["update_s"], 1),
                   mfu=round(j["model_tflop"] * 1e12 / j["update_s"] / peak, 4),
                   peak_tflops=round(peak / 1e12, 1),
                   matmul_tflops=round(j["matmul_tflops"], 1),
                   update_peak_mem_gib=round(j["peak_mem_gib"], 2),
                   rollout_tokens_per_s=round(j["rollout_tokens"] / j["rollout_s"], 1),
                   update_compile_s=round(j["update_compile_s"], 1),
                   rollout_compile_s=round(j["rollout_compile_s"], 1))
        if "check_rel_err" in j:
            out["fused_vs_xla_rel_err"] = j["check_rel_err"]
    if "torch" in res:
        r = res["torch"]
        out.update(torch_update_s=round(r["update_s"], 4),
                   torch_rollout_tokens_per_s=round(r["rollout_tokens"] / r["rollout_s"], 1),
                   torch_peak_mem_gib=round(r.get("peak_mem_gib", 0.0), 2))
        if "jax" in res:
            j = res["jax"]
            out["torch_mfu"] = round(out["mfu"] * j["update_s"] / r["update_s"], 4)
            out["update_ratio_vs_reference"] = round(r["update_s"] / j["update_s"], 3)
            out["rollout_ratio_vs_reference"] = round(
                out["rollout_tokens_per_s"] / out["torch_rollout_tokens_per_s"], 3)
    for k, v in out.items():
        print(f"  {k:28s} {v}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
