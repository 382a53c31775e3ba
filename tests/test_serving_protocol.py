"""The wire format, the request checks and the device queue, without a server."""
import json
import pickle
import struct
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load as st_load, save as st_save

from stepvideo_ms.formats.safetensors_io import bf16_to_f32, f32_to_bf16_bits
from stepvideo_ms.serving import protocol
from stepvideo_ms.serving.client import normalize_url
from stepvideo_ms.serving.device_queue import DeviceQueue, QueueFull
from stepvideo_ms.serving.limits import Limits, check_fields, check_float_tensor, check_prompts
from stepvideo_ms.serving.protocol import RequestError


def raw_message(header: dict, data: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


META = {"protocol": protocol.PROTOCOL, "fields": "{}"}


# ---- round trips -------------------------------------------------------------------------------
def test_round_trip_all_dtypes_and_fields():
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2)),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "i32": np.array([-1, 7], np.int32),
        "u8": np.array([0, 255], np.uint8),
        "b": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5, np.float32),
    }
    fields = {"prompts": ["a cat", "一只猫", ""], "seed": 7, "sample": False}
    msg = protocol.decode(protocol.encode(fields, tensors))
    assert msg.fields == fields
    assert set(msg.tensors) == set(tensors)
    for k, v in tensors.items():
        assert msg.tensors[k].dtype == v.dtype and msg.tensors[k].shape == v.shape, k
        np.testing.assert_array_equal(msg.tensors[k], v)


def test_bf16_travels_as_bits_and_widens_exactly():
    x = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    msg = protocol.decode(protocol.encode({}, {"x": x}, bf16=["x"]))
    assert msg.wire_dtypes["x"] == "BF16" and msg.tensors["x"].dtype == np.uint16
    np.testing.assert_array_equal(msg.float32("x"), bf16_to_f32(f32_to_bf16_bits(x)))


def test_message_is_a_standard_safetensors_file():
    x = np.arange(4, dtype=np.float32)
    body = protocol.encode({"prompts": ["p"]}, {"x": x})
    np.testing.assert_array_equal(st_load(body)["x"], x)
    # and a file written by the safetensors package decodes, given our metadata
    other = st_save({"y": np.ones((2, 2), np.float32)}, metadata=META)
    np.testing.assert_array_equal(protocol.decode(other).tensors["y"], np.ones((2, 2)))


def test_header_is_padded_to_eight_bytes_and_length_is_reported():
    pieces, length = protocol.encode_chunks({"a": "x"}, {"t": np.ones(3, np.float32)})
    (n,) = struct.unpack("<Q", bytes(pieces[0][:8]))
    assert n % 8 == 0 and length == sum(len(memoryview(p).cast("B")) for p in pieces)
    assert b"".join(protocol.iter_bytes(pieces, chunk=5)) == protocol.encode({"a": "x"}, {"t": np.ones(3, np.float32)})


def test_encode_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError, match="complex"):
        protocol.encode({}, {"c": np.ones(2, np.complex64)})
    with pytest.raises(ValueError, match="bf16"):
        protocol.encode({}, {"x": np.ones(2, np.float32)}, bf16=["y"])


# ---- malformed messages: every one a RequestError naming a field, nothing executed --------------------------
def _pickle_bomb_bytes(path):
    class Bomb:
        def __reduce__(self):
            return (open, (str(path), "w"))
    return pickle.dumps({"prompts": Bomb()})


BAD = {
    "empty": b"",
    "short": b"\x01\x02",
    "length beyond body": struct.pack("<Q", 1000) + b"{}",
    "zero length": struct.pack("<Q", 0) + b"{}",
    "not utf8": struct.pack("<Q", 4) + b"\xff\xfe\xfa\xfb",
    "not json": struct.pack("<Q", 4) + b"{abc",
    "json list": raw_message([]),  # type: ignore[arg-type]
    "no metadata": raw_message({}),
    "wrong protocol": raw_message({"__metadata__": {"protocol": "other/9", "fields": "{}"}}),
    "fields not json": raw_message({"__metadata__": {"protocol": protocol.PROTOCOL, "fields": "{"}}),
    "fields a list": raw_message({"__metadata__": {"protocol": protocol.PROTOCOL, "fields": "[]"}}),
    "unknown dtype": raw_message({"__metadata__": META, "x": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
    "negative shape": raw_message({"__metadata__": META, "x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0"),
    "float shape": raw_message({"__metadata__": META, "x": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}, b"\0"),
    "rank 9": raw_message({"__metadata__": META, "x": {"dtype": "U8", "shape": [1] * 9, "data_offsets": [0, 1]}}, b"\0"),
    "offsets past end": raw_message({"__metadata__": META, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
    "size mismatch": raw_message({"__metadata__": META, "x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "absurd shape": raw_message({"__metadata__": META, "x": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 8]}}, b"\0" * 8),
    "overlap": raw_message({"__metadata__": META, "x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                            "y": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3),
    "gap": raw_message({"__metadata__": META, "x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\0" * 2),
    "stray bytes": raw_message({"__metadata__": META, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0" * 5),
    "extra entry key": raw_message({"__metadata__": META, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "z": 1}}, b"\0"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_messages_are_request_errors(name):
    with pytest.raises(RequestError) as info:
        protocol.decode(BAD[name])
    assert info.value.status == 400 and info.value.field and info.value.message


def test_truncated_good_message_is_rejected():
    body = protocol.encode({}, {"x": np.ones((4, 4), np.float32)})
    for cut in (1, 9, len(body) // 2, len(body) - 1):
        with pytest.raises(RequestError):
            protocol.decode(body[:cut])


def test_pickle_payload_is_rejected_and_never_executed(tmp_path):
    target = tmp_path / "pwned"
    with pytest.raises(RequestError):
        protocol.decode(_pickle_bomb_bytes(target))
    assert not target.exists()


def test_header_cap():
    body = protocol.encode({"prompts": ["x" * 5000]})
    with pytest.raises(RequestError) as info:
        protocol.decode(body, max_header_bytes=1024)
    assert info.value.status == 413


# ---- checks -------------------------------------------------------------------------------------
def _msg(fields=None, **tensors):
    return protocol.decode(protocol.encode(fields or {}, tensors))


LATENT_AXES = ("batch", "frames", "channels", "height", "width")
LATENT_BOUNDS = {"batch": (1, 2), "frames": (1, 6), "channels": (8, 8), "height": (1, 4), "width": (1, 4)}


def _check(arr, **kw):
    return check_float_tensor(_msg(x=arr), "x", LATENT_AXES, LATENT_BOUNDS, **kw)


def test_float_tensor_checks():
    good = np.zeros((1, 3, 8, 2, 2), np.float32)
    assert _check(good).dtype == np.float32
    assert _check(good.astype(np.float16)).dtype == np.float32
    cases = [
        (good.astype(np.int64), "dtype I64"),
        (good[0], "5 dimensions"),
        (np.zeros((3, 3, 8, 2, 2), np.float32), "batch=3"),
        (np.zeros((1, 3, 4, 2, 2), np.float32), "channels=4"),
        (np.zeros((1, 3, 8, 5, 2), np.float32), "height=5"),
        (np.zeros((1, 0, 8, 2, 2), np.float32), "frames=0"),
    ]
    for arr, text in cases:
        with pytest.raises(RequestError, match=text) as info:
            _check(arr)
        assert info.value.status == 422 and info.value.field == "x"
    bad = good.copy()
    bad[0, 1, 2, 0, 0] = np.nan
    bad[0, 2, 2, 0, 0] = np.inf
    with pytest.raises(RequestError, match="2 non-finite"):
        _check(bad)
    with pytest.raises(RequestError, match="multiple of 3"):
        _check(np.zeros((1, 4, 8, 2, 2), np.float32), multiples={"frames": 3})


def test_prompt_checks():
    lim = Limits(max_prompts=3, max_prompt_chars=10)
    assert check_prompts(["", "abc"], lim) == ["", "abc"]
    for value, text in [([], "empty"), ("abc", "list"), (["a"] * 4, "limit is 3"), (["x" * 11], "11 characters"),
                        ([1], "must be a string"), (["a\x00b"], "NUL")]:
        with pytest.raises(RequestError, match=text) as info:
            check_prompts(value, lim)
        assert info.value.status == 422


def test_field_checks_name_missing_and_unknown():
    with pytest.raises(RequestError, match="missing field 'prompts'"):
        check_fields(_msg({"prompt": ["x"]}), required=("prompts",))
    with pytest.raises(RequestError, match="unknown field"):
        check_fields(_msg({"prompts": ["x"], "prompt": 1}), required=("prompts",))
    with pytest.raises(RequestError, match="missing tensor 'latents'"):
        check_fields(_msg(), tensors=("latents",))
    with pytest.raises(RequestError, match="unexpected tensor"):
        check_fields(_msg(other=np.ones(1, np.float32)), tensors=())


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="queue_size"):
        Limits(queue_size=0)


# ---- urls ---------------------------------------------------------------------------------------
def test_normalize_url():
    assert normalize_url("127.0.0.1", 5001) == "http://127.0.0.1:5001"
    assert normalize_url("127.0.0.1:6000", 5001) == "http://127.0.0.1:6000"
    assert normalize_url("http://localhost:7000/", 5000) == "http://localhost:7000"
    assert normalize_url("[::1]:5000", 1) == "http://[::1]:5000"
    for bad in ("", "ftp://x:1", "http://h:1/caption-api", "http://h:99999"):
        with pytest.raises(ValueError):
            normalize_url(bad, 5000)


# ---- the device queue ----------------------------------------------------------------------------
def test_queue_runs_one_job_at_a_time_in_order():
    q = DeviceQueue(queue_size=8, wait_s=10)
    active, peak, order = [0], [0], []
    lock = threading.Lock()

    def job(i):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
            order.append(i)
        return i * i

    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, q.run(job, i))) for i in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.002)
    for t in threads:
        t.join(10)
    q.close()
    assert results == {i: i * i for i in range(6)} and peak[0] == 1 and sorted(order) == list(range(6))


def test_queue_full_is_refused_with_retry_after_and_errors_propagate():
    q = DeviceQueue(queue_size=1, wait_s=10)
    gate = threading.Event()
    started = threading.Event()

    def blocker():
        started.set()
        gate.wait(10)
        return "done"

    out, ran = [], []
    t1 = threading.Thread(target=lambda: out.append(q.run(blocker)))
    t1.start()
    started.wait(5)
    t2 = threading.Thread(target=lambda: out.append(q.run(lambda: ran.append("second") or "second")))
    t2.start()
    deadline = time.monotonic() + 5
    while q.depth < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(QueueFull) as info:
        q.run(lambda: "third")
    assert info.value.retry_after_s >= 1
    gate.set()
    t1.join(5)
    t2.join(5)
    assert sorted(out) == ["done", "second"] and ran == ["second"]

    def boom():
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"):
        q.run(boom)
    assert q.run(lambda: 42) == 42  # the worker survives a failing job
    assert q.stats()["failed"] == 1 and q.stats()["rejected"] == 1
    q.close()


def test_queue_wait_limit():
    q = DeviceQueue(queue_size=4, wait_s=0.2)
    gate = threading.Event()
    t = threading.Thread(target=lambda: q.run(gate.wait, 5))
    t.start()
    time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(QueueFull, match="waited"):
        q.run(lambda: None)
    assert time.monotonic() - start < 2
    gate.set()
    t.join(5)
    q.close()
