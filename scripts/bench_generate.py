"""Sampling benchmark: generation after a ~1k-token video prompt on the `bench` size, ours
(`tempo_jax.generate`, jitted, KV cache, prefill once per prompt) vs transformers `generate`
on the same weights, same run, this machine's CPU; the sides run interleaved.

Two workloads, 128 new tokens per row, no early stop:
- greedy: 8 prompts (the same video, different question text), temperature 0;
- sampled: 1 prompt, G = 8 samples at temperature 1 (a PIR-GRPO rollout group; transformers
  `num_return_sequences=8`, which prefills the prompt for every sample).

    python scripts/bench_generate.py [--reps 3] [--new-tokens 128] [--threads 2]

Last output line: a JSON object with `ours_tokens_per_s`, `reference_tokens_per_s` and
`ratio_vs_reference` (generated tokens per second, prefill included; the sampled workload,
the rollout case) and per workload the median / min / max of each side and of the ratio, and
our first call (compilation) apart. Token equality with transformers is not measured here:
transformers 5.x computes M-RoPE positions its own way (see README); `tests/test_generate.py`
checks our sampler against a torch loop fed the same positions.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchlib import ratio_spread, spread, time_interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="greedy prompts / sampled G")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--grid", default="4,20,44", help="video grid t,h,w in patches")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import tempo_jax
    from tempo_jax.generate import generate
    from tempo_jax.models.qwen2_5_vl import preset

    torch.set_num_threads(args.threads)
    cfg = preset("bench")
    t, h, w = (int(x) for x in args.grid.split(","))
    n_patches = t * h * w
    n_vis = n_patches // cfg.vision.merge_unit
    rng = np.random.default_rng(0)
    b, new = args.batch, args.new_tokens

    def prompt(i: int) -> np.ndarray:
        text = np.random.default_rng(i).integers(0, 150_000, size=96)
        return np.concatenate([text[:64], [cfg.vision_start_token_id],
                               np.full(n_vis, cfg.video_token_id), [cfg.vision_end_token_id],
                               text[64:]])

    ids = np.stack([prompt(i) for i in range(b)])
    seq = ids.shape[1]
    pixels = rng.standard_normal((n_patches, cfg.vision.patch_dim)).astype(np.float32)
    print(f"bench model, prompt {seq} tokens ({n_vis} video tokens), {new} new tokens, "
          f"{args.threads} threads", flush=True)

    torch.manual_seed(0)
    ref = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(**cfg.to_hf_dict(torch_dtype="float32"))).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        model = tempo_jax.load_pretrained(d, dtype=jnp.float32)

    workloads = {
        # name: (prompts, samples per prompt, temperature)
        "greedy": (ids, 1, 0.0),
        "sampled": (ids[:1], b, 1.0),
    }
    out: dict = {"prompt_tokens": seq, "new_tokens": new, "threads": args.threads,
                 "backend": jax.default_backend()}
    for name, (p_ids, g, temp) in workloads.items():
        n = p_ids.shape[0]
        grid = np.asarray([[t, h, w]] * n)
        vids = np.concatenate([pixels] * n)
        key = [0]

        def ours(p_ids=p_ids, g=g, temp=temp, grid=grid, vids=vids, key=key):
            key[0] += 1
            return generate(model, p_ids, np.ones_like(p_ids), pixel_values_videos=vids,
                            video_grid_thw=grid, second_per_grid_ts=[1.0] * len(grid),
                            max_new_tokens=new, temperature=temp, num_samples=g,
                            rng=jax.random.key(key[0])).tokens

        tkw = dict(input_ids=torch.as_tensor(p_ids),
                   attention_mask=torch.ones(p_ids.shape, dtype=torch.long),
                   pixel_values_videos=torch.as_tensor(vids),
                   video_grid_thw=torch.as_tensor(grid),
                   second_per_grid_ts=torch.ones(n), max_new_tokens=new, min_new_tokens=new,
                   do_sample=temp > 0, num_return_sequences=g, pad_token_id=0)
        if temp > 0:
            tkw.update(temperature=temp, top_p=1.0, top_k=0)

        def reference(tkw=tkw):
            with torch.no_grad():
                return ref.generate(**tkw)[:, seq:].numpy()

        t0 = time.perf_counter()
        ours()
        compile_s = time.perf_counter() - t0
        reference()
        times = time_interleaved({"ours": ours, "reference": reference}, args.reps)
        rows = n * g
        res = {
            "rows": rows,
            "ours_s": spread(times["ours"]), "reference_s": spread(times["reference"]),
            "ours_tokens_per_s": round(rows * new / spread(times["ours"])["median"], 1),
            "reference_tokens_per_s": round(rows * new / spread(times["reference"])["median"],
                                            1),
            "ratio_vs_reference": ratio_spread(times["reference"], times["ours"]),
            "ours_first_call_s": round(compile_s, 2),
        }
        out[name] = res
        print(f"  {name}: {json.dumps(res)}", flush=True)
    s = out["sampled"]
    out.update(ours_tokens_per_s=s["ours_tokens_per_s"],
               reference_tokens_per_s=s["reference_tokens_per_s"],
               ratio_vs_reference=s["ratio_vs_reference"]["median"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
