"""The logical-axis rules, and a sharded load on 8 fake CPU devices (in a subprocess, so the
rest of the suite keeps one device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tempo_jax import sharding as shd


def test_logical_to_spec_without_mesh():
    assert shd.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("batch", "seq")) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("norm",)) == P(None)
    assert shd.logical_to_spec(None) == P()


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.make_mesh(data=2, fsdp=2, tensor=1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="at most one"):
        shd.make_mesh(data=-1, fsdp=-1)


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[2])
    import tempo_jax
    from tempo_jax import sharding as shd
    from hf_reference import pixels, vision_prompt

    assert len(jax.devices()) == 8, jax.devices()
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = tempo_jax.load_pretrained(sys.argv[1], dtype=jnp.float32, mesh=mesh)
    single = tempo_jax.load_pretrained(sys.argv[1], dtype=jnp.float32)
    specs = {
        "q_proj": str(sharded.model.layers[0].self_attn.q_proj.kernel[...].sharding.spec),
        "down_proj": str(sharded.model.layers[0].mlp.down_proj.kernel[...].sharding.spec),
        "embed": str(sharded.model.embed_tokens.embedding[...].sharding.spec),
        "norm": str(sharded.model.norm.weight[...].sharding.spec),
        "n_devices": len(sharded.model.layers[0].mlp.up_proj.kernel[...].sharding.device_set),
    }
    rng = np.random.default_rng(0)
    grid = (2, 8, 12)
    ids = np.asarray([vision_prompt(rng, [("video", grid)], [4, 4])] * 2)
    pv = pixels(rng, [grid, grid])
    kw = dict(pixel_values_videos=pv, video_grid_thw=[grid, grid])
    a = np.asarray(sharded(ids, **kw))
    b = np.asarray(single(ids, **kw))
    from tempo_jax.generate import generate
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # rows of different lengths
    gkw = dict(max_new_tokens=12, temperature=0)
    ga = generate(sharded, ids, mask, **kw, **gkw)
    gb = generate(single, ids, mask, **kw, **gkw)
    print(json.dumps({**specs, "max_diff": float(np.abs(a - b).max()),
                      "same_greedy": bool((ga.tokens == gb.tokens).all()),
                      "logprob_diff": float(np.abs(ga.logprobs - gb.logprobs).max())}))
    """
)


def test_sharded_load_and_generate_match_single_device(tmp_path):
    from hf_reference import tiny_hf_model

    tiny_hf_model(seed=1).save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    tests_dir = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt"), tests_dir],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["q_proj"] == "P('fsdp', 'tensor')"
    assert res["down_proj"] == "P('tensor', 'fsdp')"
    assert res["embed"] == "P('tensor', 'fsdp')"
    assert res["norm"] == "P(None,)"
    assert res["n_devices"] == 8
    assert res["max_diff"] <= 1e-5, res
    assert np.isfinite(res["max_diff"])
    assert res["same_greedy"] and res["logprob_diff"] <= 1e-4, res
