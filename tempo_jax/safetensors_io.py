"""A small reader/writer of the safetensors format, without mmap.

Why not the official library: its loaders map the whole file, so placing a 7B checkpoint on
devices tensor by tensor keeps every touched page resident and RSS climbs towards the file size
on top of the device copies. Here each `read` does a plain seek + readinto into a fresh buffer
that the caller owns and can drop once the tensor is on device. All file access goes through
`etils.epath`, so the same code reads gs:// on TPU pods and local paths elsewhere, and bf16 is
mapped to `ml_dtypes.bfloat16` because numpy has no bf16.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the
byte buffer; offsets are relative to the start of the buffer.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
from etils import epath

__all__ = [
    "CheckpointReader",
    "SafetensorsReader",
    "write_safetensors",
    "write_sharded",
]

PathLike = str | os.PathLike | epath.Path

# safetensors dtype name <-> numpy dtype (little-endian, as the format prescribes).
_ST_TO_NP: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in _ST_TO_NP.items()}

_METADATA_KEY = "__metadata__"
# The reference implementation refuses larger headers; so do we (guards against garbage).
_MAX_HEADER_BYTES = 100_000_000
# Fallback chunk for file objects without readinto (bounds the temporary copy).
_CHUNK_BYTES = 64 * 2**20

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _np_dtype_to_st(dtype: np.dtype) -> str:
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _NP_TO_ST[dt]
    except KeyError:
        raise TypeError(
            f"dtype {dt} cannot be stored in safetensors (supported: {sorted(_ST_TO_NP)})"
        ) from None


def _read_exact_into(f: BinaryIO, buf: memoryview, what: str) -> None:
    """Fill `buf` from `f`; raise ValueError(what) if the file ends early."""
    total = len(buf)
    pos = 0
    readinto = getattr(f, "readinto", None)
    while pos < total:
        if readinto is not None:
            n = readinto(buf[pos:])
        else:
            chunk = f.read(min(total - pos, _CHUNK_BYTES))
            n = len(chunk)
            buf[pos : pos + n] = chunk
        if not n:
            raise ValueError(f"{what}: file ends after {pos} of {total} bytes (truncated file?)")
        pos += n


class SafetensorsReader:
    """One .safetensors file: the header is parsed eagerly, tensors are read on demand.

    Nothing is cached and nothing is mmapped, so the caller controls peak memory. The file is
    opened lazily on the first `read` and kept open (plain buffered file) until `close()`.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = epath.Path(path)
        self._fh: BinaryIO | None = None
        if not self.path.exists():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        with self.path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(
                    f"{self.path}: not a safetensors file (only {len(prefix)} bytes, "
                    "need an 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES:
                raise ValueError(
                    f"{self.path}: header length {n} exceeds {_MAX_HEADER_BYTES} bytes "
                    "(corrupt or not a safetensors file)"
                )
            raw = f.read(n)
            if len(raw) < n:
                raise ValueError(
                    f"{self.path}: truncated file, header says {n} header bytes but only "
                    f"{len(raw)} follow"
                )
            f.seek(0, io.SEEK_END)
            file_size = f.tell()
        self._data_start = 8 + n
        self._buffer_len = file_size - self._data_start
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: header is not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: header must be a JSON object, got {type(header)}")
        meta = header.pop(_METADATA_KEY, None) or {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise ValueError(f"{self.path}: __metadata__ must map str to str, got {meta!r}")
        self._metadata: dict[str, str] = dict(meta)
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self._entries[name] = self._parse_entry(name, info)
        # File order, so that reading keys() in order is a forward sweep through the file.
        self._entries = dict(sorted(self._entries.items(), key=lambda kv: kv[1][2]))

    def _parse_entry(self, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{where}: header entry must be an object, got {info!r}")
        st_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if st_dtype not in _ST_TO_NP:
            raise ValueError(f"{where}: unsupported dtype {st_dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"{where}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{where}: bad data_offsets {offsets!r}")
        dtype = _ST_TO_NP[st_dtype]
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise ValueError(
                f"{where}: data_offsets span {end - begin} bytes but {st_dtype}{shape} "
                f"needs {expected}"
            )
        if end > self._buffer_len:
            raise ValueError(
                f"{where}: truncated file, data ends at buffer byte {end} but the buffer "
                f"holds only {self._buffer_len} bytes"
            )
        return dtype, tuple(shape), begin, end

    def _entry(self, key: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} not in {self.path}") from None

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> np.dtype:
        """Numpy dtype; `ml_dtypes.bfloat16` for BF16."""
        return self._entry(key)[0]

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entry(key)
        return end - begin

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def read(self, key: str) -> np.ndarray:
        """A fresh, writable, C-contiguous array: seek + readinto, no mmap, no cache."""
        dtype, shape, begin, end = self._entry(key)
        raw = np.empty(end - begin, dtype=np.uint8)
        if self._fh is None:
            self._fh = self.path.open("rb")
        self._fh.seek(self._data_start + begin)
        _read_exact_into(self._fh, memoryview(raw), f"{self.path}: tensor {key!r}")
        return raw.view(dtype).reshape(shape)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsReader({str(self.path)!r}, {len(self)} tensors)"


class CheckpointReader:
    """A Hugging Face checkpoint directory: `model.safetensors`, or shards + index.

    Like transformers, a single `model.safetensors` wins over an index. A path to one
    .safetensors file is accepted too. Headers of all shards are parsed up front (cheap), so a
    missing shard or an index that disagrees with its shards fails here, not mid-load.
    """

    def __init__(self, directory: PathLike) -> None:
        self.directory = epath.Path(directory)
        self._readers: dict[str, SafetensorsReader] = {}
        self._weight_map: dict[str, str] = {}
        single = self.directory / SINGLE_FILE
        index = self.directory / INDEX_FILE
        if self.directory.name.endswith(".safetensors") and not self.directory.is_dir():
            self._add_whole_file(self.directory)
            self.directory = self.directory.parent
        elif single.exists():
            self._add_whole_file(single)
        elif index.exists():
            self._load_index(index)
        elif not self.directory.exists():
            raise FileNotFoundError(f"checkpoint directory not found: {self.directory}")
        else:
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in checkpoint directory {self.directory}"
            )

    def _add_whole_file(self, path: epath.Path) -> None:
        reader = SafetensorsReader(path)
        self._readers[path.name] = reader
        self._weight_map = dict.fromkeys(reader.keys(), path.name)

    def _load_index(self, index: epath.Path) -> None:
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        for fname in dict.fromkeys(weight_map.values()):
            self._readers[fname] = SafetensorsReader(self.directory / fname)
        for key, fname in weight_map.items():
            if key not in self._readers[fname]:
                raise ValueError(f"{index}: maps {key!r} to {fname}, which does not contain it")
        self._weight_map = dict(weight_map)

    def _reader(self, key: str) -> SafetensorsReader:
        try:
            return self._readers[self._weight_map[key]]
        except KeyError:
            raise KeyError(f"tensor {key!r} not in checkpoint {self.directory}") from None

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def file_of(self, key: str) -> str:
        """File name (relative to the directory) holding `key`."""
        self._reader(key)
        return self._weight_map[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._reader(key).dtype(key)

    def nbytes(self, key: str) -> int:
        return self._reader(key).nbytes(key)

    def read(self, key: str) -> np.ndarray:
        """A fresh array for `key` (see `SafetensorsReader.read`)."""
        return self._reader(key).read(key)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_array(name: str, value: Any) -> np.ndarray:
    if not isinstance(name, str) or not name or name == _METADATA_KEY:
        raise ValueError(f"bad tensor name {name!r}")
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    _np_dtype_to_st(arr.dtype)  # fail early on unsupported dtypes
    # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _items(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    if isinstance(tensors, Mapping):
        return iter(tensors.items())
    return iter(tensors)


def _full_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    # transformers refuses safetensors files whose metadata lacks format=pt.
    meta = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError(f"safetensors metadata must map str to str, got {meta!r}")
    return meta


def _write_arrays(
    path: epath.Path, arrays: list[tuple[str, np.ndarray]], metadata: dict[str, str]
) -> None:
    # Larger itemsizes first (stable): every tensor then starts at a multiple of its itemsize,
    # which the official torch loader relies on for zero-copy views.
    order = sorted(arrays, key=lambda kv: -kv[1].dtype.itemsize)
    header: dict[str, Any] = {_METADATA_KEY: metadata}
    offset = 0
    for name, arr in order:
        header[name] = {
            "dtype": _np_dtype_to_st(arr.dtype),
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in order:
            if arr.nbytes:
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def write_safetensors(
    path: PathLike,
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write one .safetensors file readable by the official library and transformers.

    `metadata` is merged over the default {"format": "pt"}. The header is space-padded to a
    multiple of 8 bytes like the reference writer; data goes out tensor by tensor.
    """
    arrays: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for name, value in _items(tensors):
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r} writing {path}")
        seen.add(name)
        arrays.append((name, _as_array(name, value)))
    _write_arrays(epath.Path(path), arrays, _full_metadata(metadata))


_SHARD_RE_TEMPLATE = r"{prefix}-\d{{5}}-of-\d{{5}}\.safetensors"


def write_sharded(
    directory: PathLike,
    tensors: Iterable[tuple[str, Any]]
    | Mapping[str, Any]
    | Callable[[], Iterable[tuple[str, Any]]],
    *,
    max_shard_bytes: int = 5 * 2**30,
    prefix: str = "model",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Stream tensors into HF-style shards, holding at most one shard's tensors in memory.

    Shards are written under temporary names (the count is unknown until the stream ends), then
    renamed to `{prefix}-0000i-of-0000n.safetensors` with `{prefix}.safetensors.index.json`
    (`total_size` = sum of tensor bytes). With a single shard the file is `{prefix}.safetensors`
    and no index is written, as transformers does. A tensor larger than `max_shard_bytes` gets
    its own shard. Stale files of an earlier save with the same prefix (other shard counts, an
    old index) are removed so the directory holds exactly one checkpoint. Returns the shard file
    names, relative to `directory`.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = _full_metadata(metadata)
    stream = tensors() if callable(tensors) else tensors
    token = uuid.uuid4().hex[:12]
    temp_names: list[str] = []
    shard_keys: list[list[str]] = []
    seen: set[str] = set()
    total_size = 0
    pending: list[tuple[str, np.ndarray]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        name = f".{prefix}-tmp-{token}-{len(temp_names):05d}.safetensors"
        temp_names.append(name)
        _write_arrays(directory / name, pending, meta)
        shard_keys.append([k for k, _ in pending])
        pending, pending_bytes = [], 0

    try:
        for key, value in _items(stream):
            if key in seen:
                raise ValueError(f"duplicate tensor name {key!r} writing {directory}")
            seen.add(key)
            arr = _as_array(key, value)
            if pending and pending_bytes + arr.nbytes > max_shard_bytes:
                flush()
            pending.append((key, arr))
            pending_bytes += arr.nbytes
            total_size += arr.nbytes
        if pending or not temp_names:
            flush()
    except BaseException:
        for name in temp_names:
            (directory / name).unlink(missing_ok=True)
        raise

    n = len(temp_names)
    single = f"{prefix}.safetensors"
    if n == 1:
        final = [single]
    else:
        final = [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index_name = f"{prefix}.safetensors.index.json"
    shard_re = re.compile(_SHARD_RE_TEMPLATE.format(prefix=re.escape(prefix)))
    for old in directory.iterdir():
        stale = old.name == index_name or old.name == single or shard_re.fullmatch(old.name)
        if stale:  # includes same-named files of an earlier save, so the renames never collide
            old.unlink(missing_ok=True)
    for tmp, dst in zip(temp_names, final, strict=True):
        (directory / tmp).rename(directory / dst)
    if n > 1:
        weight_map = {k: dst for keys, dst in zip(shard_keys, final, strict=True) for k in keys}
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return final
