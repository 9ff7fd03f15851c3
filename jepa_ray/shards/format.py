"""The shard format: how a sample's parts are stored inside a webdataset `.tar`.

A sample is `<key>.image.npy` (uint16, shape (1, S, S); float16 (1, D, S, S) for a CT volume),
`<key>.ehr.npz` (EHR arrays) and `<key>.meta.json` (safe metadata), any of the first two absent
when the modality is missing. Encoding is deterministic (equal arrays and metadata, equal bytes);
decoding views the payload without copying. `jepa_ray.ingest.write` writes shards in this format,
`jepa_ray.stream` reads them, and `manifest.json` (`jepa_ray.shards.manifest`) describes them.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import math
import struct
import zipfile
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive with fixed timestamps, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_ZIP_TIME)
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """A .npy file in memory."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    d = ast.literal_eval(header.decode("latin1"))
    dtype = np.dtype(d["descr"])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return dtype, tuple(d["shape"]), bool(d["fortran_order"])


def decode_npy(data: bytes, offset: int = 0, size: int | None = None) -> np.ndarray:
    """A .npy payload as an array viewing `data` (headers parsed once per distinct header)."""
    if data[offset : offset + 6] != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    major = data[offset + 6]
    n = 2 if major == 1 else 4
    hlen = int.from_bytes(data[offset + 8 : offset + 8 + n], "little")
    start = offset + 8 + n + hlen
    dtype, shape, fortran = _npy_header(bytes(data[offset + 8 + n : start]))
    count = math.prod(shape)
    if size is not None and start + count * dtype.itemsize > offset + size:
        raise ValueError("truncated .npy payload")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_npz(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_npz`: the arrays straight from the zip entries (views into `data`).

    Any other .npz (compressed, or with trailing data descriptors) goes through `np.load`.
    """
    out: dict[str, np.ndarray] = {}
    pos = 0
    while data[pos : pos + 4] == b"PK\x03\x04":
        flags, method = struct.unpack_from("<HH", data, pos + 6)
        size, name_len, extra_len = (
            struct.unpack_from("<IHH", data, pos + 22)[0],
            *struct.unpack_from("<HH", data, pos + 26),
        )
        if method != 0 or flags & 0x08:  # compressed, or sizes in a trailing descriptor: the slow path
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        name = data[pos + 30 : pos + 30 + name_len].decode()
        body = pos + 30 + name_len + extra_len
        out[name.removesuffix(".npy")] = decode_npy(data, body, size)
        pos = body + size
    if not out:
        raise ValueError("not an .npz archive")
    return out


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.7g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v) for v in obj]
    return obj


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, floats to 7 significant digits): equal metadata, equal bytes.

    Seven digits are more than any statistic or spacing here needs, and keep long digit runs (in
    which an 8-digit date could appear by chance) out of the metadata.
    """
    return json.dumps(_rounded(obj), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
