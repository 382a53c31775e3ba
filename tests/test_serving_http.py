"""Real model servers over HTTP on loopback: round trips, a corpus of bad requests, auth, health."""
import json
import pickle
import struct

import numpy as np
import pytest
import requests

from serving_support import ServerProcess
from stepvideo_ms.models.vae_config import FRAMES_PER_CHUNK, LATENT_FRAMES_PER_CHUNK, SPATIAL_COMPRESSION
from stepvideo_ms.serving import protocol
from stepvideo_ms.serving.client import RemoteClient, RemoteServerError

TOKEN = "test-token-3f9a"
BODY_CAP_MB = 1
TIMEOUT = (5, 120)
PROMPTS = ["一只小红狐狸在雪地里奔跑，镜头缓缓推进。", "A paper boat drifts along a rainy harbour.", ""]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from stepvideo_ms.tools.tiny import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0, task="t2v")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """Both services in one process, token required, 1 MiB body cap."""
    srv = ServerProcess(tiny_model_dir, str(tmp_path_factory.mktemp("logs")), "both",
                        "--port", 0, "--max_body_mb", BODY_CAP_MB, "--auth_token", TOKEN).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with RemoteClient(server.url, token=TOKEN, read_timeout=120, retries=2, backoff=0.1) as c:
        yield c


@pytest.fixture(scope="module")
def local_models(tiny_model_dir):
    from stepvideo_ms.models.caption import CaptionEncoder
    from stepvideo_ms.models.vae import AutoencoderKL

    return (CaptionEncoder.from_model_dir(tiny_model_dir, progress=False),
            AutoencoderKL.from_pretrained(f"{tiny_model_dir}/vae", progress=False))


def small_latents(vae, seed=1):
    shape = (1, LATENT_FRAMES_PER_CHUNK, vae.config.z_channels, 1, 2)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def small_image(seed=2):
    s = SPATIAL_COMPRESSION
    return np.random.default_rng(seed).uniform(-1, 1, (1, 1, 3, s, 2 * s)).astype(np.float32)


# ---- the server says what it is -----------------------------------------------------------------------
def test_ready_line_gives_both_urls_on_one_port(server):
    assert server.urls["caption"] == server.urls["vae"]


def test_health(client):
    h = client.health()
    assert h["status"] == "ok" and h["device"] == "CPU" and h["dtype"] == "float32" and h["auth"] is True
    assert set(h["loaded"]) == {"caption", "vae"}
    assert h["endpoints"] == sorted([protocol.CAPTION_PATH, protocol.VAE_DECODE_PATH, protocol.VAE_ENCODE_PATH])
    assert h["queue"]["depth"] == 0 and h["limits"]["max_body_bytes"] == BODY_CAP_MB * 1024 * 1024
    assert h["version"] and h["protocol"] == protocol.PROTOCOL


# ---- round trips equal the in-process results -------------------------------------------------------
def test_caption_round_trip_equals_in_process(client, local_models):
    remote = client.caption(PROMPTS)
    local = local_models[0].encode(PROMPTS)
    assert set(remote) == {"y", "y_mask", "clip_embedding"}
    for k in local:
        assert remote[k].dtype == local[k].dtype and remote[k].shape == local[k].shape, k
        np.testing.assert_array_equal(remote[k], local[k], err_msg=k)


def test_vae_decode_round_trip_equals_in_process(client, local_models):
    from mindspore import Tensor

    vae = local_models[1]
    latents = small_latents(vae)
    remote = client.vae_decode(latents)
    local = vae.decode(Tensor(latents), progress=False).asnumpy()
    assert remote.shape == local.shape and remote.dtype == np.float32
    np.testing.assert_array_equal(remote, local)
    half = client.vae_decode(latents, response_dtype="bfloat16")
    np.testing.assert_allclose(half, local, rtol=1e-2, atol=1e-2)


def test_vae_encode_round_trip_equals_in_process(client, local_models):
    from mindspore import Tensor

    vae = local_models[1]
    image = small_image()
    for sample, seed in ((True, 3), (False, 0)):
        remote = client.vae_encode(image, seed=seed, sample=sample)
        local = vae.encode(Tensor(image), seed=seed, sample=sample, progress=False).asnumpy()
        assert remote.shape == local.shape
        np.testing.assert_array_equal(remote, local)


# ---- bad requests ------------------------------------------------------------------------------------
def _body(fields=None, **tensors):
    return protocol.encode(fields or {}, tensors)


def _raw(header, data=b""):
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


class _Bomb:
    """Unpickling this would create the file at `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def bad_requests(vae_z, frames_per_chunk, latent_chunk, sf, bomb_path):
    """(name, method, path, headers, body, expected status, expected field or None)."""
    ct = {"Content-Type": protocol.CONTENT_TYPE}
    good_lat = np.zeros((1, latent_chunk, vae_z, 2, 2), np.float32)
    nan_lat = good_lat.copy()
    nan_lat[0, 0, 0, 0, 0] = np.nan
    inf_lat = good_lat.copy()
    inf_lat[0, 0, 1, 1, 1] = -np.inf
    good = _body({"prompts": ["a cat"]})
    meta = {"protocol": protocol.PROTOCOL, "fields": "{}"}
    return [
        ("empty body", "POST", protocol.CAPTION_PATH, ct, b"", 400, "body"),
        ("truncated message", "POST", protocol.VAE_DECODE_PATH, ct, _body(latents=good_lat)[:-7], 400, None),
        ("corrupt header", "POST", protocol.CAPTION_PATH, ct, good[:8] + b"#" * 6 + good[14:], 400, "body"),
        ("header length lies", "POST", protocol.CAPTION_PATH, ct, struct.pack("<Q", 10 ** 9) + good[8:], 400, "body"),
        ("non-UTF-8 bytes", "POST", protocol.CAPTION_PATH, ct, struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc\x80\x81\x82\x83",
         400, "body"),
        ("pickle payload", "POST", protocol.CAPTION_PATH, ct, pickle.dumps({"prompts": _Bomb(bomb_path)}), 400, "body"),
        ("pickle as octet-stream", "POST", protocol.CAPTION_PATH, {"Content-Type": "application/octet-stream"},
         pickle.dumps({"prompts": _Bomb(bomb_path)}), 415, "Content-Type"),
        ("wrong content type", "POST", protocol.CAPTION_PATH, {"Content-Type": "application/json"},
         json.dumps({"prompts": ["a"]}).encode(), 415, "Content-Type"),
        ("no content type", "POST", protocol.CAPTION_PATH, {}, good, 415, "Content-Type"),
        ("wrong protocol", "POST", protocol.CAPTION_PATH, ct,
         _raw({"__metadata__": {"protocol": "stepvideo-tensors/0", "fields": "{}"}}), 400, "protocol"),
        ("missing field", "POST", protocol.CAPTION_PATH, ct, _body({"prompt": ["a"]}), 400, "prompts"),
        ("unknown field", "POST", protocol.CAPTION_PATH, ct, _body({"prompts": ["a"], "debug": 1}), 400, "debug"),
        ("prompts not a list", "POST", protocol.CAPTION_PATH, ct, _body({"prompts": "a cat"}), 422, "prompts"),
        ("empty prompt list", "POST", protocol.CAPTION_PATH, ct, _body({"prompts": []}), 422, "prompts"),
        ("10000-character prompt", "POST", protocol.CAPTION_PATH, ct, _body({"prompts": ["x" * 10000]}), 422, "prompts"),
        ("too many prompts", "POST", protocol.CAPTION_PATH, ct, _body({"prompts": ["a"] * 65}), 422, "prompts"),
        ("prompt not a string", "POST", protocol.CAPTION_PATH, ct, _body({"prompts": ["a", 3]}), 422, "prompts"),
        ("missing tensor", "POST", protocol.VAE_DECODE_PATH, ct, _body(), 400, "latents"),
        ("wrong dtype", "POST", protocol.VAE_DECODE_PATH, ct, _body(latents=good_lat.astype(np.int32)), 422, "latents"),
        ("wrong rank", "POST", protocol.VAE_DECODE_PATH, ct, _body(latents=good_lat[0]), 422, "latents"),
        ("NaN", "POST", protocol.VAE_DECODE_PATH, ct, _body(latents=nan_lat), 422, "latents"),
        ("Inf", "POST", protocol.VAE_DECODE_PATH, ct, _body(latents=inf_lat), 422, "latents"),
        ("wrong channels", "POST", protocol.VAE_DECODE_PATH, ct,
         _body(latents=np.zeros((1, latent_chunk, vae_z + 1, 2, 2), np.float32)), 422, "latents"),
        ("absurd dimensions (declared)", "POST", protocol.VAE_DECODE_PATH, ct,
         _raw({"__metadata__": meta, "latents": {"dtype": "F32", "shape": [1, 10 ** 6, vae_z, 10 ** 4, 10 ** 4],
                                                 "data_offsets": [0, 16]}}, b"\0" * 16), 400, "latents"),
        ("latent side over the limit", "POST", protocol.VAE_DECODE_PATH, ct,
         _body(latents=np.zeros((1, latent_chunk, vae_z, 300, 1), np.float32)), 422, "latents"),
        ("batch over the limit", "POST", protocol.VAE_DECODE_PATH, ct,
         _body(latents=np.zeros((9, latent_chunk, vae_z, 1, 1), np.float32)), 422, "latents"),
        ("unknown response dtype", "POST", protocol.VAE_DECODE_PATH, ct,
         _body({"response_dtype": "int8"}, latents=good_lat), 422, "response_dtype"),
        ("image side not a multiple of the VAE factor", "POST", protocol.VAE_ENCODE_PATH, ct,
         _body(frames=np.zeros((1, 1, 3, sf + 1, sf), np.float32)), 422, "frames"),
        ("image with 4 channels", "POST", protocol.VAE_ENCODE_PATH, ct,
         _body(frames=np.zeros((1, 1, 4, sf, sf), np.float32)), 422, "frames"),
        ("bad frame count", "POST", protocol.VAE_ENCODE_PATH, ct,
         _body(frames=np.zeros((1, frames_per_chunk + 1, 3, sf, sf), np.float32)), 422, "frames"),
        ("seed not an integer", "POST", protocol.VAE_ENCODE_PATH, ct,
         _body({"seed": "7"}, frames=np.zeros((1, 1, 3, sf, sf), np.float32)), 422, "seed"),
        ("oversized body", "POST", protocol.CAPTION_PATH, ct, b"\0" * (BODY_CAP_MB * 1024 * 1024 + 1), 413, "body"),
        ("wrong method", "GET", protocol.CAPTION_PATH, ct, None, 405, None),
        ("unknown endpoint", "POST", "/generate", ct, good, 404, None),
    ]


def _send(server, method, path, headers, body, token=TOKEN):
    h = dict(headers)
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    with requests.Session() as s:
        s.trust_env = False
        return s.request(method, server.url + path, data=body, headers=h, timeout=TIMEOUT)


def test_bad_request_corpus(server, client, local_models, tmp_path):
    vae = local_models[1]
    bomb = tmp_path / "unpickled"
    cases = bad_requests(vae.config.z_channels, FRAMES_PER_CHUNK, LATENT_FRAMES_PER_CHUNK, SPATIAL_COMPRESSION,
                         str(bomb))
    assert len(cases) >= 20
    wrong = []
    for name, method, path, headers, body, status, field in cases:
        r = _send(server, method, path, headers, body)
        payload = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
        if r.status_code != status or (field is not None and payload.get("field") != field) or not payload.get("error"):
            wrong.append(f"{name}: got {r.status_code} {r.text[:200]!r}, expected {status} field {field}")
    assert not wrong, "\n".join(wrong)
    assert not bomb.exists(), "a pickle payload was unpickled"
    out = client.caption(["still serving"])  # the server is unharmed
    assert out["y"].shape[0] == 1
    assert client.health()["answered"].get("500") is None


def test_chunked_body_without_length_is_411(server):
    r = _send(server, "POST", protocol.CAPTION_PATH, {"Content-Type": protocol.CONTENT_TYPE},
              iter([_body({"prompts": ["a"]})]))
    assert r.status_code == 411 and r.json()["field"] == "Content-Length"


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_requests_without_the_right_token_get_401(server, token):
    for method, path in (("POST", protocol.CAPTION_PATH), ("GET", protocol.HEALTH_PATH), ("POST", "/nowhere")):
        r = _send(server, method, path, {"Content-Type": protocol.CONTENT_TYPE}, _body({"prompts": ["a"]}), token)
        assert r.status_code == 401 and r.headers.get("WWW-Authenticate") == "Bearer", (method, path)


def test_client_errors_name_the_url_and_the_field(server, client):
    with pytest.raises(RemoteServerError) as info:
        client.caption([])
    err = info.value
    assert err.status == 422 and err.field == "prompts" and server.url + protocol.CAPTION_PATH in str(err)
    anon = RemoteClient(server.url, token="nope", retries=0)
    with pytest.raises(RemoteServerError, match="401.*STEPVIDEO_AUTH_TOKEN"):
        anon.health()


def test_token_from_environment(server, monkeypatch):
    monkeypatch.setenv("STEPVIDEO_AUTH_TOKEN", TOKEN)
    assert RemoteClient(server.url).health()["status"] == "ok"
