"""The shard format's encoding: deterministic bytes, lossless round trips."""

from __future__ import annotations

import time

import numpy as np

from jepa_ray.shards.format import decode_npz, dumps, encode_npz


def test_npz_is_deterministic_and_round_trips():
    arrays = {"b": np.arange(5, dtype=np.int32), "a": np.array([1.5, np.nan], dtype=np.float32)}
    first = encode_npz(arrays)
    time.sleep(1.1)  # zip members carry a timestamp: it must not be the clock's
    assert encode_npz(dict(reversed(list(arrays.items())))) == first
    back = decode_npz(first)
    assert back.keys() == arrays.keys()
    np.testing.assert_array_equal(back["b"], arrays["b"])
    assert back["a"].dtype == np.float32 and np.isnan(back["a"][1])


def test_json_is_canonical_and_rounded():
    assert dumps({"b": 1, "a": [0.12345678901, 2.0]}) == b'{"a":[0.1234568,2.0],"b":1}'
    assert dumps({"x": 1 / 3}) == dumps({"x": 0.3333333333})
