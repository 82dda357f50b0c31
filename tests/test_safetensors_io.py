"""Our safetensors reader/writer: bit-exact round trips, interop with the official library in
both directions, streaming shards, no mmap on reads, and errors that name the file."""

from __future__ import annotations

import json
import mmap
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tempo_jax import safetensors_io as sio


def _all_dtype_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((3, 5))
    return {
        "f32": f.astype(np.float32),
        "f16": f.astype(np.float16),
        "bf16": f.astype(ml_dtypes.bfloat16),
        "f64": f,
        "i64": rng.integers(-(2**62), 2**62, (4, 2), dtype=np.int64),
        "i32": rng.integers(-(2**31), 2**31 - 1, (7,), dtype=np.int32),
        "i16": rng.integers(-(2**15), 2**15 - 1, (2, 3, 2), dtype=np.int16),
        "i8": rng.integers(-128, 127, (9,), dtype=np.int8),
        "u8": rng.integers(0, 255, (3, 3), dtype=np.uint8),
        "bool": rng.integers(0, 2, (5,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=ml_dtypes.bfloat16),
        # Odd sizes before wide dtypes exercise the alignment ordering of the writer.
        "odd_u8": np.arange(3, dtype=np.uint8),
        "non_contig": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
    }


def _bits(a: np.ndarray) -> np.ndarray:
    a = a.copy(order="C")
    return a.view(f"u{a.dtype.itemsize}") if a.dtype != bool else a


def _assert_bitwise(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape
    np.testing.assert_array_equal(_bits(a), _bits(b))


def test_round_trip_all_dtypes(tmp_path: Path) -> None:
    tensors = _all_dtype_tensors()
    path = tmp_path / "x.safetensors"
    sio.write_safetensors(path, tensors, metadata={"note": "hi"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8 + n - 1 : 8 + n] in (b" ", b"}")

    r = sio.SafetensorsReader(path)
    assert sorted(r.keys()) == sorted(tensors)
    assert r.metadata() == {"format": "pt", "note": "hi"}
    assert r.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
    for k, v in tensors.items():
        assert r.shape(k) == v.shape
        assert r.nbytes(k) == v.nbytes
        got = r.read(k)
        assert got.flags.writeable and got.flags.c_contiguous
        _assert_bitwise(got, v)
    # Each tensor starts at a multiple of its itemsize (torch zero-copy loaders need this).
    header = json.loads(raw[8 : 8 + n])
    for k, v in tensors.items():
        assert header[k]["data_offsets"][0] % v.dtype.itemsize == 0
    got = r.read("f32")
    got[0, 0] = 123.0  # fresh buffer: writing to it leaves the file alone
    assert r.read("f32")[0, 0] == tensors["f32"][0, 0]
    r.close()


def test_ours_read_by_official(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st_numpy = pytest.importorskip("safetensors.numpy")
    st_torch = pytest.importorskip("safetensors.torch")
    tensors = _all_dtype_tensors()
    path = tmp_path / "ours.safetensors"
    sio.write_safetensors(path, tensors.items())

    no_bf16 = {k: v for k, v in tensors.items() if v.dtype != ml_dtypes.bfloat16}
    loaded = st_numpy.load_file(str(path))
    for k, v in no_bf16.items():
        _assert_bitwise(loaded[k], v)

    loaded_t = st_torch.load_file(str(path))
    assert loaded_t["bf16"].dtype == torch.bfloat16
    for k, v in tensors.items():
        t = loaded_t[k]
        if v.dtype == ml_dtypes.bfloat16:
            np.testing.assert_array_equal(t.view(torch.int16).numpy(), v.view(np.int16))
        else:
            _assert_bitwise(t.numpy(), v)


def test_official_read_by_ours(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(4, 7, generator=g).to(torch.bfloat16),
        "f32": torch.randn(3, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(),
        "f64": torch.randn(5, generator=g).double(),
        "i64": torch.arange(-5, 5),
        "i32": torch.arange(6, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(10, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "official.safetensors"
    st_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    r = sio.SafetensorsReader(str(path))
    assert sorted(r.keys()) == sorted(tensors)
    assert r.metadata() == {"format": "pt"}
    for k, t in tensors.items():
        got = r.read(k)
        assert got.shape == tuple(t.shape)
        if t.dtype == torch.bfloat16:
            assert got.dtype == np.dtype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(
                got.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16)
            )
        else:
            _assert_bitwise(got, t.numpy())


def _stream(tensors: dict[str, np.ndarray]):
    yield from tensors.items()


def test_write_sharded_many_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        f"layer.{i}.w": rng.standard_normal((8, 16)).astype(ml_dtypes.bfloat16) for i in range(7)
    }
    tensors["big"] = np.ones((64, 64), np.float32)  # > max_shard_bytes: own shard
    tensors["tiny"] = np.arange(3, dtype=np.int64)
    ckpt = tmp_path / "ckpt"
    names = sio.write_sharded(ckpt, lambda: _stream(tensors), max_shard_bytes=600)
    n = len(names)
    assert n > 2
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [*names, "model.safetensors.index.json"]
    )

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == set(names)
    for name in names:  # every key lives in exactly the shard the index names
        keys = sio.SafetensorsReader(ckpt / name).keys()
        assert all(index["weight_map"][k] == name for k in keys)
        assert sio.SafetensorsReader(ckpt / name).metadata() == {"format": "pt"}

    assert sum(len(sio.SafetensorsReader(ckpt / nm).keys()) for nm in names) == len(tensors)

    with sio.CheckpointReader(ckpt) as ck:
        assert sorted(ck.keys()) == sorted(tensors)
        assert "big" in ck and "nope" not in ck
        assert ck.file_of("big") == index["weight_map"]["big"]
        for k, v in tensors.items():
            assert ck.shape(k) == v.shape and ck.dtype(k) == v.dtype
            _assert_bitwise(ck.read(k), v)
        with pytest.raises(KeyError, match="nope"):
            ck.read("nope")

    # Re-saving into one shard removes the stale shards and index (transformers prefers the
    # single file, but a stale index would still be wrong).
    names1 = sio.write_sharded(ckpt, _stream({"a": np.ones(2, np.float32)}))
    assert names1 == ["model.safetensors"]
    assert [p.name for p in ckpt.iterdir()] == ["model.safetensors"]


def test_write_sharded_single_shard(tmp_path: Path) -> None:
    tensors = _all_dtype_tensors()
    ckpt = tmp_path / "one"
    names = sio.write_sharded(ckpt, _stream(tensors), metadata={"k": "v"})
    assert names == ["model.safetensors"]
    assert [p.name for p in ckpt.iterdir()] == ["model.safetensors"]
    ck = sio.CheckpointReader(ckpt)
    assert ck.file_of("bf16") == "model.safetensors"
    for k, v in tensors.items():
        _assert_bitwise(ck.read(k), v)
    st_torch = pytest.importorskip("safetensors.torch")
    assert sorted(st_torch.load_file(str(ckpt / "model.safetensors"))) == sorted(tensors)


def test_read_does_not_mmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nomap.safetensors"
    sio.write_safetensors(path, {"w": np.ones((256, 256), np.float32)})

    def refuse(*args, **kwargs):
        raise AssertionError("mmap used")

    monkeypatch.setattr(mmap, "mmap", refuse)
    r = sio.SafetensorsReader(path)
    arr = r.read("w")
    assert arr.sum() == 256 * 256
    if sys.platform.startswith("linux"):
        maps = Path("/proc/self/maps").read_text()
        assert str(path.resolve()) not in maps  # file still open, but not mapped
    r.close()


def test_errors_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    sio.write_safetensors(good, {"w": np.arange(100, dtype=np.float32)})
    raw = good.read_bytes()

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        sio.SafetensorsReader(missing)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        sio.CheckpointReader(tmp_path)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"truncated\.safetensors.*truncated"):
        sio.SafetensorsReader(truncated)

    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(raw[:20])
    with pytest.raises(ValueError, match="cut_header.safetensors"):
        sio.SafetensorsReader(cut_header)

    garbage = tmp_path / "garbage.safetensors"
    body = b"{not json!!"
    garbage.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ValueError, match=r"garbage\.safetensors.*JSON"):
        sio.SafetensorsReader(garbage)

    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ValueError, match="huge.safetensors"):
        sio.SafetensorsReader(huge)

    r = sio.SafetensorsReader(good)
    with pytest.raises(KeyError, match=r"nope.*good\.safetensors"):
        r.read("nope")

    # A file that shrinks after the header was parsed fails on read, naming file and tensor.
    r2 = sio.SafetensorsReader(good)
    good.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match=r"good\.safetensors.*'w'.*truncated"):
        r2.read("w")

    with pytest.raises(TypeError, match="complex"):
        sio.write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})


def test_index_pointing_at_missing_shard(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    sio.write_sharded(
        ckpt,
        _stream({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}),
        max_shard_bytes=16,
    )
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        sio.CheckpointReader(ckpt)


_RSS_SCRIPT = """
import sys
from tempo_jax import safetensors_io as sio

def status_kib(field):
    # VmHWM, not ru_maxrss: the latter carries the parent's peak over fork + exec.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

path = sys.argv[1]
base = status_kib("VmRSS")
r = sio.SafetensorsReader(path)
kept = [r.read(k) for k in r.keys()]  # stands in for the device copies a loader keeps
r.close()
print((status_kib("VmHWM") - base) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_reading_all_tensors(tmp_path: Path) -> None:
    # Reading everything must cost ~1x the file, not file + mapped pages (the official
    # safe_open loader measures ~2.25x here).
    path = tmp_path / "rss.safetensors"
    tensors = {f"t{i}": np.full((8, 2**20), i, np.float32) for i in range(4)}  # 4 x 32 MiB
    sio.write_safetensors(path, tensors)
    del tensors
    size = path.stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    extra = int(out.stdout.split()[-1])
    assert extra < 1.3 * size, (extra, size)
