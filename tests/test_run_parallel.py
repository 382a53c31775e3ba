"""run_parallel.py end to end: real model servers, real msrun workers, the tiny model.

The parallel run's final latents (--save_latents) must equal a single process's within
1e-4 x (1 + max|x|), for T2V and TI2V, on a latent grid whose token count 2 does not divide
(3 latent frames x 3 x 5 = 45 tokens). The validation errors come before any weight is read.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from serving_support import ServerProcess
from stepvideo_ms.generation import checks, cli
from stepvideo_ms.parallel.msrun import run_msrun
from stepvideo_ms.formats.safetensors_io import load_file

LAUNCH_TIMEOUT = 420
ODD_GRID = ["--num_frames", "17", "--height", "48", "--width", "80"]  # latents 3 x 3 x 5: 45 tokens
# (ulysses, pp, cfg, shard): world 4 uses both Ulysses and the pipeline; the last one splits the CFG halves
# over two ranks that also split the block weights
# (ulysses, pp, cfg, blocks): the blocks held whole on the card (None), sharded ("shard"), or offloaded to
# one host copy that the two ranks of the stage share ("offload")
LAYOUTS = [(2, 1, 1, "offload"), (1, 2, 1, None), (2, 2, 1, None), (1, 1, 2, "shard")]


def _make_model(tmp_path_factory, task):
    out = tmp_path_factory.mktemp(f"tiny_{task}") / "model"
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", str(out), "--task", task, "--seed", "3"],
                   check=True, cwd=REPO, capture_output=True, env={**os.environ, "GLOG_v": "3"})
    return str(out)


@pytest.fixture(scope="module", params=["t2v", "ti2v"])
def served(request, tmp_path_factory):
    """(task, model dir, server url) with a caption+VAE server running on the tiny model."""
    model = _make_model(tmp_path_factory, request.param)
    srv = ServerProcess(model, str(tmp_path_factory.mktemp("logs")), request.param, "--port", 0).start()
    yield request.param, model, srv.url
    srv.stop()


def _args(task, model, url, out_dir, extra=()):
    args = ["--model_dir", model, "--caption_url", url, "--vae_url", url, "--prompt", "a red house under the sun",
            "--infer_steps", "2", "--seed", "11", *ODD_GRID, "--save_path", str(out_dir),
            "--save_latents", str(out_dir / "latents.safetensors"), "--no_progress", *extra]
    if task == "ti2v":
        args += ["--first_image_path", os.path.join(REPO, "assets", "demo.png"), "--motion_score", "7"]
    return args


@pytest.fixture(scope="module")
def single(served, tmp_path_factory):
    task, model, url = served
    out = tmp_path_factory.mktemp(f"single_{task}")
    assert cli.main(_args(task, model, url, out)) == 0
    return load_file(str(out / "latents.safetensors"))["latents"], out


def test_single_process_writes_video_json_and_latents(served, single):
    import imageio.v3 as iio
    import json
    latents, out = single
    assert np.isfinite(latents).all() and latents.std() > 0
    mp4 = [p for p in out.iterdir() if p.suffix == ".mp4"]
    assert len(mp4) == 1
    frames = np.stack(list(iio.imiter(str(mp4[0]))))
    assert frames.shape == (17, 48, 80, 3)
    record = json.loads(mp4[0].with_suffix(".json").read_text())
    assert record["settings"]["seed"] == 11 and record["settings"]["task"] == served[0]
    assert set(record["timings"]) >= {"load_s", "encode_s", "denoise_s", "decode_s"}
    assert record["memory"]["anonymous_gib"] > 0 and "file_backed_gib" in record["memory"]  # CPU: no device statistics
    assert record["parallel"]["stages"] == [[0, 2]]  # each stage's [first, end) layers, as data
    assert mp4[0].name == "a_red_house_under_the_sun.mp4"  # the prompt's words, no spaces


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("layout", LAYOUTS,
                         ids=lambda l: f"ulysses{l[0]}-pp{l[1]}" + (f"-cfg{l[2]}" if l[2] > 1 else "") + (f"-{l[3]}" if l[3] else ""))
def test_msrun_latents_equal_single_process(served, single, tmp_path, layout):
    import json
    task, model, url = served
    ulysses, pp, cfg, blocks = layout
    reference, _ = single
    out = tmp_path / f"u{ulysses}p{pp}c{cfg}"
    maps = tmp_path / "host_maps"
    maps.mkdir()
    extra = ["--ulysses_degree", str(ulysses), "--pp_degree", str(pp), "--cfg_degree", str(cfg)]
    extra += {"shard": ["--shard_weights", "--card_gb", "64", "--no_video"],  # and a layout that fits is accepted
              "offload": ["--offload"],  # with the video and its record
              }.get(blocks, ["--no_video"])
    result = run_msrun("run_parallel.py", _args(task, model, url, out, extra), ulysses * pp * cfg, str(out / "logs"),
                       LAUNCH_TIMEOUT, extra_env={"STEPVIDEO_OFFLOAD_DIR": str(maps)})
    assert result.ok, result.logs()
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    assert latents.shape == reference.shape == (1, 3, 8, 3, 5)
    tol = 1e-4 * (1 + np.abs(reference).max())
    assert np.abs(latents - reference).max() <= tol
    if blocks == "offload":  # one host copy for the stage's two ranks, its file gone once both had loaded
        records = [json.loads(p.read_text()) for p in out.glob("*.json")]
        assert [r["offload"]["host_copy"] for r in records] == ["per host"], records
        assert os.listdir(maps) == []


# ---- validation: clear errors naming the argument, before any weight or server is touched ----------
DEAD = "http://127.0.0.1:9"  # nothing listens: reaching a server would be a different error


@pytest.fixture(scope="module")
def t2v_model(tmp_path_factory):
    return _make_model(tmp_path_factory, "t2v")


@pytest.mark.parametrize("world,extra,message", [
    ("4", ["--ulysses_degree", "2", "--pp_degree", "1"], "must equal the world size 4"),
    ("4", ["--ulysses_degree", "4"], "num_attention_heads"),
    ("4", ["--ulysses_degree", "1", "--pp_degree", "4"], "num_layers"),
    ("2", ["--ulysses_degree", "2", "--ring_degree", "2"], "ring_degree=2 is not supported"),
    ("2", ["--pp_degree", "2", "--pp_split", "5"], "pp_split"),
    ("1", ["--first_image_path", "x.png"], "first_image_path is for TI2V"),
    ("1", ["--height", "0"], "height=0"),
    ("1", ["--save_latents", "out.npy"], "--save_latents"),
    ("4", ["--cfg_degree", "3", "--ulysses_degree", "2"], "cfg_degree=3 must be 1 or 2"),
    ("2", ["--cfg_degree", "2", "--ulysses_degree", "2"], "must equal the world size 2"),
    ("2", ["--cfg_degree", "2", "--cfg_scale", "1.0"], "--cfg_scale 1.0 <= 1 has no unconditional half"),
    ("1", ["--shard_weights"], "drop --shard_weights"),
    ("2", ["--ulysses_degree", "2", "--card_gb", "0.001"], "--card_gb 0.001: ulysses 2 x pp 1 is predicted"),
    ("2", ["--ulysses_degree", "2", "--card_gb", "-1"], "--card_gb -1 must be positive"),
    ("1", ["--vae_tile", "2"], "--vae_tile/--vae_budget_gb tile the in-process VAE"),
    ("1", ["--vae_url", "local", "--vae_tile", "0"], "--vae_tile 0 must be >= 1"),
    ("1", ["--vae_url", "local", "--vae_tile", "2", "--vae_budget_gb", "4"], "not both"),
    ("1", ["--vae_url", "local", "--vae_budget_gb", "1e-9"], "--vae_budget_gb: VAE decode budget"),
])
def test_validation_errors_name_the_argument(t2v_model, tmp_path, monkeypatch, capsys, world, extra, message):
    monkeypatch.setenv("MS_WORKER_NUM", world)
    args = ["--model_dir", t2v_model, "--caption_url", DEAD, "--vae_url", DEAD, "--prompt", "x",
            "--save_path", str(tmp_path), *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not any(tmp_path.iterdir())


def test_missing_model_dir_and_shard(t2v_model, tmp_path, capsys):
    assert cli.main(["--model_dir", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "--model_dir" in capsys.readouterr().err
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(t2v_model, broken)
    (broken / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    assert cli.main(["--model_dir", str(broken), "--prompt", "x", "--caption_url", DEAD]) == 2
    assert "missing shard" in capsys.readouterr().err


def test_unreachable_server_is_named(t2v_model, tmp_path, capsys):
    assert cli.main(["--model_dir", t2v_model, "--prompt", "x", "--caption_url", DEAD, "--vae_url", DEAD,
                        "--save_path", str(tmp_path)]) == 1
    assert "127.0.0.1:9" in capsys.readouterr().err


# ---- output files: numbered names, --overwrite, the save folder, the token --------------------------
def test_existing_output_name_gets_a_number_unless_overwrite(tmp_path):
    from stepvideo_ms.formats.output_names import free_stem

    assert free_stem(str(tmp_path), "clip") == "clip"
    (tmp_path / "clip.mp4").write_bytes(b"first run")
    assert free_stem(str(tmp_path), "clip") == "clip-1"
    (tmp_path / "clip-1.json").write_text("{}")  # a JSON alone also holds the name
    assert free_stem(str(tmp_path), "clip") == "clip-2"
    assert free_stem(str(tmp_path), "clip", overwrite=True) == "clip"
    args = cli.build_parser().parse_args(["--model_dir", "m", "--prompt", "p", "--save_path", str(tmp_path),
                                             "--output_file_name", "clip"])
    settings = checks.settings_from(args, "t2v")
    assert checks.output_stem(args, settings) == "clip-2"


@pytest.mark.parametrize("prompt,stem", [
    ("a cat playing the piano", "a_cat_playing_the_piano"),
    ("一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光", "一名宇航员在月球上发现一块石碑_上面印有_stepfun_字样_闪闪发光"),
    ("it's $HOME; rm -rf / && `x` > y | z * ? (a) [b] {c} \\ \"q\" !", "it_s_HOME_rm_-rf_x_y_z_a_b_c_q"),
    ("  --flag-like", "flag-like"), ("...", "video"), ("café/crème", "café_crème"),
])
def test_default_file_names_need_no_quoting_in_a_shell(prompt, stem):
    import shlex
    from stepvideo_ms.diffusion.pipeline import safe_stem

    assert safe_stem(prompt) == stem
    assert shlex.quote(stem) == stem or not stem.isascii()  # shlex quotes any non-ASCII letter; none is special
    assert not set(stem) & set(" \t\n'\"`$&|;<>()[]{}*?!\\/~#") and not stem.startswith("-")


def test_save_folder_checks_create_nothing(tmp_path):
    from stepvideo_ms.formats.output_names import check_save_folder

    assert check_save_folder(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--save_path .*f is a file"):
        check_save_folder(str(tmp_path / "f"))
    with pytest.raises(ValueError, match="cannot be created"):
        check_save_folder(str(tmp_path / "f" / "sub"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_token_is_recorded_as_set_or_not_set(monkeypatch):
    from stepvideo_ms.generation.outputs import public_arguments

    monkeypatch.delenv("STEPVIDEO_AUTH_TOKEN", raising=False)
    args = cli.build_parser().parse_args(["--model_dir", "m", "--prompt", "p", "--auth_token", "s3cret"])
    assert public_arguments(args)["auth_token"] == "set" and args.auth_token == "s3cret"
    args.auth_token = None
    assert public_arguments(args)["auth_token"] == "not set"
    monkeypatch.setenv("STEPVIDEO_AUTH_TOKEN", "s3cret")
    assert public_arguments(args)["auth_token"] == "set"


def test_rounding_note_is_not_also_a_warning(recwarn):
    args = cli.build_parser().parse_args(["--model_dir", "m", "--prompt", "p", "--height", "50"])
    settings = checks.settings_from(args, "t2v")
    assert settings.height == 48 and len(settings.notes) == 1 and len(recwarn) == 0


@pytest.mark.parametrize("flag,value", [("--cfg_scale", "nan"), ("--time_shift", "inf"), ("--motion_score", "-inf"),
                                        ("--card_gb", "NaN")])
def test_non_finite_floats_are_refused_when_parsed(tmp_path, capsys, flag, value):
    """Before the model folder is even looked at: nothing loads for a nan."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model_dir", str(tmp_path / "absent"), "--prompt", "a", f"{flag}={value}"])
    assert exc.value.code == 2
    assert f"argument {flag}: '{value}' is not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--seed", "-1"], "seed=-1 is under the allowed range"),
    (["--seed", str(10 ** 40)], "seed=an integer of 41 digits is over the limit"),
    (["--cfg_scale", "1e400"], "argument --cfg_scale: '1e400' is not a finite number"),
])
def test_out_of_range_numbers_stop_before_loading(t2v_model, tmp_path, capsys, extra, message):
    args = ["--model_dir", t2v_model, "--caption_url", "local", "--vae_url", "local", "--prompt", "x",
            "--save_path", str(tmp_path / "out"), *extra]
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prompts_file_lines_with_non_finite_numbers_are_bad_lines(tmp_path):
    from stepvideo_ms.generation.jobs import read_prompts_file
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "a", "cfg_scale": NaN}\n{"prompt": "b", "seed": 1e400}\n'
                    '{"prompt": "c", "cfg_scale": 1e400}\n{"prompt": "d", "seed": 7}\n')
    jobs, errors = read_prompts_file(str(path), "t2v")
    assert [n for n, _ in jobs] == [4]
    assert errors == [f"{path} line 1: not valid JSON (NaN is not JSON (RFC 8259 has no NaN or Infinity): give a "
                      "finite number)",
                      f"{path} line 2: seed must be an integer, got inf",
                      f"{path} line 3: cfg_scale=inf is not a finite number: give a number from 0 to 100 "
                      "(9.0 for Step-Video, 5.0 for Turbo)"]
