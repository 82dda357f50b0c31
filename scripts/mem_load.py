"""Peak host memory of `load_pretrained` on a random ~1B-parameter bf16 checkpoint, written
once as a single file and once sharded.

Each load runs in a fresh process: the baseline is that process's RSS after importing JAX and
initialising the backend; the peak is the kernel's high-water mark (VmHWM) after loading.
Target: (peak - baseline) < 1.3 x the checkpoint's bytes.

    python scripts/mem_load.py [--dir /tmp/tempo_mem] [--keep]

Last output line: a JSON object with the ratio for each layout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
jax.devices()
import tempo_jax

def vm(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = vm('VmRSS:')
model = tempo_jax.load_pretrained(sys.argv[1], dtype=jnp.bfloat16)
jax.block_until_ready(jax.tree.leaves(model))
print(json.dumps({'baseline': base, 'peak': vm('VmHWM:'), 'after': vm('VmRSS:')}))
"""


def one_b_config():
    from tempo_jax.models.qwen2_5_vl.config import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=2),
        vision=VisionConfig(depth=4, out_hidden_size=2048, fullatt_block_indexes=(3,)),
        tie_word_embeddings=True,
    )


def write_random_checkpoint(path: Path, max_shard_bytes: int) -> int:
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    from flax import nnx

    from tempo_jax.models.qwen2_5_vl.params import abstract_model, hf_key, to_hf
    from tempo_jax.safetensors_io import write_sharded

    cfg = one_b_config()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict("bfloat16")))
    rng = np.random.default_rng(0)
    abstract = abstract_model(cfg, jnp.bfloat16)
    total = 0

    def tensors():
        nonlocal total
        for p, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
            shape = to_hf(p, np.empty(var.get_value().shape, np.uint8), cfg).shape
            arr = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
            total += arr.nbytes
            yield hf_key(p), arr

    write_sharded(path, tensors(), max_shard_bytes=max_shard_bytes)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/tempo_mem")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    result = {}
    for layout, shard in (("single_file", 1 << 40), ("sharded", 512 << 20)):
        ckpt = root / layout
        nbytes = write_random_checkpoint(ckpt, shard)
        files = sorted(p.name for p in ckpt.glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt)], check=True,
                             capture_output=True, text=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = (m["peak"] - m["baseline"]) / nbytes
        result[layout] = {
            "files": len(files), "checkpoint_gb": round(nbytes / 1e9, 3),
            "baseline_gb": round(m["baseline"] / 1e9, 3),
            "peak_above_baseline_gb": round((m["peak"] - m["baseline"]) / 1e9, 3),
            "ratio": round(ratio, 3),
        }
        print(f"{layout:12s} {len(files)} file(s), checkpoint {nbytes / 1e9:.2f} GB, "
              f"peak above baseline {(m['peak'] - m['baseline']) / 1e9:.2f} GB "
              f"= {ratio:.2f}x (target < 1.3x)", flush=True)
        if not args.keep:
            shutil.rmtree(ckpt)
    result["params"] = int(result["single_file"]["checkpoint_gb"] * 1e9 / 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
