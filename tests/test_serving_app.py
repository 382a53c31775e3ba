"""The server app in process (a model failing inside a request) and the command line's choices."""
import os
import shutil

import numpy as np
import pytest

from stepvideo_ms.models.vae_config import CHECKPOINT_FILE, LATENT_FRAMES_PER_CHUNK, SPATIAL_COMPRESSION
from stepvideo_ms.formats.safetensors_io import SafetensorsFile, save_file_atomic
from stepvideo_ms.serving import protocol
from stepvideo_ms.serving.device_queue import DeviceQueue
from stepvideo_ms.serving.limits import Limits
from stepvideo_ms.serving.main import build_parser, ready_lines, resolve
from stepvideo_ms.serving.server import ServerState, create_app
from stepvideo_ms.serving.services import VaeService


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from stepvideo_ms.tools.tiny import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=4)


@pytest.fixture(scope="module")
def corrupt_vae_app(tiny_dir, tmp_path_factory):
    """A VAE whose decoder holds a NaN weight (a damaged download): decoding fails, encoding works."""
    folder = tmp_path_factory.mktemp("vae")
    for name in os.listdir(os.path.join(tiny_dir, "vae")):
        shutil.copy(os.path.join(tiny_dir, "vae", name), folder / name)
    f = SafetensorsFile(str(folder / CHECKPOINT_FILE))
    state = dict(f.items())
    f.close()
    victim = sorted(k for k in state if k.startswith("decoder.") and k.endswith("bias"))[-1]
    state[victim][...] = np.nan
    save_file_atomic(state, str(folder / CHECKPOINT_FILE))
    queue = DeviceQueue(2, 60)
    state = ServerState({"vae": VaeService.load(str(folder), progress=False)}, queue, Limits(), None,
                        {"device": "CPU", "device_id": 0, "dtype": "float32"})
    yield create_app(state).test_client()
    queue.close()


def test_model_failure_is_a_500_with_a_message_and_the_server_keeps_serving(corrupt_vae_app):
    app = corrupt_vae_app
    headers = {"Content-Type": protocol.CONTENT_TYPE}
    latents = np.zeros((1, LATENT_FRAMES_PER_CHUNK, 8, 1, 1), np.float32)
    r = app.post(protocol.VAE_DECODE_PATH, data=protocol.encode({}, {"latents": latents}), headers=headers)
    assert r.status_code == 500
    assert "non-finite" in r.get_json()["error"] and "frames" in r.get_json()["error"]
    image = np.zeros((1, 1, 3, SPATIAL_COMPRESSION, SPATIAL_COMPRESSION), np.float32)
    r = app.post(protocol.VAE_ENCODE_PATH, data=protocol.encode({"sample": False}, {"frames": image}),
                 headers=headers)
    assert r.status_code == 200 and r.content_type == protocol.CONTENT_TYPE
    assert protocol.decode(r.data).tensors["latents"].shape == (1, 1, 8, 1, 1)
    health = app.get(protocol.HEALTH_PATH).get_json()
    assert health["queue"]["failed"] == 1 and health["queue"]["completed"] == 1
    assert health["answered"]["500"] == 1


# ---- the command line ---------------------------------------------------------------------------------------
def _resolve(*argv):
    return resolve(build_parser().parse_args(list(argv)))


def test_services_and_default_ports(tiny_dir):
    both = _resolve("--model_dir", tiny_dir)
    assert both.enable_llm and both.enable_vae and both.port == protocol.DEFAULT_CAPTION_PORT
    llm = _resolve("--model_dir", tiny_dir, "--enable_llm", "True")
    assert llm.enable_llm and not llm.enable_vae and llm.port == protocol.DEFAULT_CAPTION_PORT
    vae = _resolve("--model_dir", tiny_dir, "--enable_vae", "true", "--enable_llm", "False")
    assert vae.enable_vae and not vae.enable_llm and vae.port == protocol.DEFAULT_VAE_PORT
    assert vae.host == "127.0.0.1"
    lines = ready_lines(both, "http://127.0.0.1:5000", {"device": "CPU", "device_id": 0, "dtype": "float32"})
    assert lines[-1] == "pass to run_parallel.py: --caption_url http://127.0.0.1:5000 --vae_url http://127.0.0.1:5000"


def test_token_from_environment(tiny_dir, monkeypatch):
    monkeypatch.setenv(protocol.AUTH_ENV, "s3cret")
    assert _resolve("--model_dir", tiny_dir).auth_token == "s3cret"
    assert _resolve("--model_dir", tiny_dir, "--auth_token", "other").auth_token == "other"


@pytest.mark.parametrize("argv,message", [
    (["--enable_llm", "False", "--enable_vae", "False"], "nothing to serve"),
    (["--vae_dir", "no_such_vae", "--enable_vae", "True"], "no_such_vae is not a directory"),
    (["--port", "70000"], "not a TCP port"),
])
def test_bad_command_lines_are_refused_before_loading(tiny_dir, argv, message):
    with pytest.raises(SystemExit, match=message):
        _resolve("--model_dir", tiny_dir, *argv)


def test_port_in_use_is_refused_before_loading():
    import socket

    from stepvideo_ms.serving.main import check_port_free

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)


def test_bad_model_dir_and_bad_boolean(tmp_path, capsys):
    with pytest.raises(SystemExit, match="is not a directory"):
        _resolve("--model_dir", str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        _resolve("--model_dir", str(tmp_path), "--enable_vae", "maybe")
    assert "expected True or False" in capsys.readouterr().err
