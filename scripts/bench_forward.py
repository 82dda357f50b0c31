"""Prefill benchmark: a ~1k-token video prompt on the `bench` size, ours (jit, after warm-up)
vs transformers PyTorch on the same weights, in the same run, on this machine's CPU.

Both sides compute what a generation prefill needs: the vision tower, the decoder over the
whole prompt, and logits at the last position only. Also measures each framework's plain
fp32 matmul GFLOP/s so the model's achieved GFLOP/s can be read against the machine's peak.

    python scripts/bench_forward.py [--reps 5] [--threads 2] [--trace]

The two sides (and the two matmuls) run interleaved, `--reps` rounds; times are medians with
min and max beside them. Last output line: a JSON object with jax/torch tokens/s, their
ratio (median, min, max over the rounds), GFLOP/s and the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from benchlib import ratio_spread, spread, time_interleaved


def text_flops(cfg, seq: int) -> float:
    """Forward matmul FLOPs (2 per multiply-add) of the decoder layers over one causal
    sequence of `seq` tokens: projections, MLP and attention scores/values (half the square)."""
    t = cfg.text
    kv = t.num_key_value_heads * t.head_dim
    q = t.num_attention_heads * t.head_dim
    per_tok = 2 * (t.hidden_size * (q + 2 * kv) + q * t.hidden_size
                   + 3 * t.hidden_size * t.intermediate_size)
    return t.num_hidden_layers * (per_tok * seq + 2 * 2 * seq * seq * q / 2)


def vision_flops(cfg, n_patches: int, window_lens, frame_lens) -> float:
    """Forward matmul FLOPs of the vision tower: patch embedding, windowed / full-frame
    blocks and the patch merger."""
    v = cfg.vision
    vd = v.hidden_size
    vit_tok = 2 * (vd * 3 * vd + vd * vd + 3 * vd * v.intermediate_size)
    full = set(v.fullatt_block_indexes)
    vit = 0.0
    for i in range(v.depth):
        lens = frame_lens if i in full else window_lens
        vit += vit_tok * n_patches + sum(2 * 2 * n * n * vd for n in lens)
    vit += 2 * v.patch_dim * vd * n_patches
    ctx = vd * v.merge_unit
    return vit + 2 * (ctx * ctx + ctx * v.out_hidden_size) * n_patches / v.merge_unit


def head_flops(cfg) -> float:
    """Forward FLOPs of the LM head at one position."""
    return 2 * cfg.text.hidden_size * cfg.text.vocab_size


def model_flops(cfg, seq: int, n_patches: int, window_lens, frame_lens) -> float:
    """Matmul FLOPs of one prefill (2 per multiply-add), last-position logits only."""
    return (text_flops(cfg, seq) + vision_flops(cfg, n_patches, window_lens, frame_lens)
            + head_flops(cfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--grid", default="4,20,44", help="video grid t,h,w in patches")
    ap.add_argument("--trace", action="store_true",
                    help="per-operation profile of one prefill (run with XLA_FLAGS="
                         "--xla_cpu_enable_xprof_traceme=true for per-operation events)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import tempo_jax
    from tempo_jax.models.layers import RuntimeOptions
    from tempo_jax.models.qwen2_5_vl import prepare_inputs, preset
    from tempo_jax.models.qwen2_5_vl.vision_meta import frame_cu_seqlens, window_index

    torch.set_num_threads(args.threads)
    cfg = preset("bench")
    t, h, w = (int(x) for x in args.grid.split(","))
    grid = np.asarray([[t, h, w]])
    n_patches = t * h * w
    n_vis = n_patches // cfg.vision.merge_unit
    rng = np.random.default_rng(0)
    text = rng.integers(0, 150_000, size=96)
    ids = np.concatenate([text[:64], [cfg.vision_start_token_id],
                          np.full(n_vis, cfg.video_token_id), [cfg.vision_end_token_id],
                          text[64:]])[None]
    seq = ids.shape[1]
    pixels = rng.standard_normal((n_patches, cfg.vision.patch_dim)).astype(np.float32)
    print(f"bench model, prompt {seq} tokens ({n_vis} video tokens, grid {t}x{h}x{w}), "
          f"{args.threads} threads", flush=True)

    # the same random weights on both sides: torch init, saved, loaded by us
    torch.manual_seed(0)
    hf_cfg = Qwen2_5_VLConfig(**cfg.to_hf_dict(torch_dtype="float32"))
    ref = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        model = tempo_jax.load_pretrained(d, dtype=jnp.float32)
        scanned = tempo_jax.load_pretrained(  # `model.scan_layers`: timed in the same rounds
            d, dtype=jnp.float32, options=RuntimeOptions(scan_layers=True))

    inputs = prepare_inputs(cfg, ids, pixel_values_videos=pixels, video_grid_thw=grid,
                            second_per_grid_ts=[1.0])
    last = np.asarray([[seq - 1]], np.int32)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x, p: nnx.merge(graphdef, s).forward(x, logits_positions=p))
    dev_inputs = jax.device_put(inputs)
    t0 = time.perf_counter()
    ours_logits = fwd(state, dev_inputs, last).block_until_ready()
    compile_s = time.perf_counter() - t0
    s_graphdef, s_state = nnx.split(scanned)
    s_fwd = jax.jit(lambda s, x, p: nnx.merge(s_graphdef, s).forward(x, logits_positions=p))
    scanned_logits = s_fwd(s_state, dev_inputs, last).block_until_ready()

    tkw = dict(
        input_ids=torch.as_tensor(ids), attention_mask=torch.ones(1, seq, dtype=torch.long),
        position_ids=torch.as_tensor(inputs["position_ids"], dtype=torch.long),
        pixel_values_videos=torch.as_tensor(pixels), video_grid_thw=torch.as_tensor(grid),
        logits_to_keep=1,
    )
    torch.set_grad_enabled(False)
    ref_logits = ref(**tkw).logits  # warm-up
    err = float(np.abs(np.asarray(ours_logits)[0, -1] - ref_logits[0, -1].numpy()).max())
    times = time_interleaved({
        "jax": lambda: fwd(state, dev_inputs, last).block_until_ready(),
        "torch": lambda: ref(**tkw),
        "jax_scanned": lambda: s_fwd(s_state, dev_inputs, last).block_until_ready()},
        args.reps)
    jax_s, torch_s = spread(times["jax"])["median"], spread(times["torch"])["median"]

    # plain matmul peak of each framework on this machine
    n = 2048
    a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    ta = torch.randn(n, n)
    torch.mm(ta, ta)
    mm_times = time_interleaved({"jax": lambda: mm(a).block_until_ready(),
                                 "torch": lambda: torch.mm(ta, ta)}, 10)
    jax_mm = 2 * n**3 / spread(mm_times["jax"])["median"] / 1e9
    torch_mm = 2 * n**3 / spread(mm_times["torch"])["median"] / 1e9

    win_lens = np.diff(window_index(grid, cfg.vision)[1])
    frame_lens = np.diff(frame_cu_seqlens(grid))
    flops = model_flops(cfg, seq, n_patches, win_lens, frame_lens)
    peak = max(jax_mm, torch_mm)
    result = {
        "prompt_tokens": seq,
        "jax_s": spread(times["jax"]),
        "torch_s": spread(times["torch"]),
        "jax_compile_s": round(compile_s, 2),
        "jax_tokens_per_s": round(seq / jax_s, 1),
        "torch_tokens_per_s": round(seq / torch_s, 1),
        "ratio_vs_reference": ratio_spread(times["torch"], times["jax"]),
        "ratio_vs_reference_scanned": ratio_spread(times["torch"], times["jax_scanned"]),
        "jax_scanned_s": spread(times["jax_scanned"]),
        "scanned_vs_unrolled_max_abs_diff": float(
            np.abs(np.asarray(scanned_logits) - np.asarray(ours_logits)).max()),
        "model_gflop": round(flops / 1e9, 2),
        "jax_gflops": round(flops / jax_s / 1e9, 1),
        "torch_gflops": round(flops / torch_s / 1e9, 1),
        "matmul_peak_gflops": round(peak, 1),
        "jax_matmul_gflops": round(jax_mm, 1),
        "torch_matmul_gflops": round(torch_mm, 1),
        "jax_fraction_of_peak": round(flops / jax_s / 1e9 / peak, 3),
        "jax_fraction_of_jax_matmul": round(flops / jax_s / 1e9 / jax_mm, 3),
        "matmul_jax_over_torch": ratio_spread(mm_times["torch"], mm_times["jax"]),
        "last_logit_max_abs_diff": err,
        "threads": args.threads,
        "backend": jax.default_backend(),
    }
    if args.trace:
        from profile_train_step import trace_step  # scripts/ is on sys.path as a script

        prefill = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(
            x, logits_positions=jnp.asarray(last)))
        result["trace"] = trace_step(prefill, state, dev_inputs)
    for k, v in result.items():
        print(f"  {k:24s} {v}")
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
