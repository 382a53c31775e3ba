"""The VAE decode in spatial tiles: the untiled frames on the golden weights, at even and uneven tiles."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor
from safetensors import safe_open

from stepvideo_ms.formats import checkpoint
from stepvideo_ms.models.vae import AutoencoderKL, blend_chunks
from stepvideo_ms.models.vae_tiled import as_tile, tile_grid
from stepvideo_ms.tools.tiny import set_small_random_weights
from stepvideo_ms.tools.verification.vae_case import VAE_RTOL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _golden(golden_dir, name="vae", folder=""):
    base = os.path.join(golden_dir, folder)
    with safe_open(os.path.join(base, f"{name}_weights.safetensors"), "np") as fh:
        config = json.loads(fh.metadata()["config"])
    with safe_open(os.path.join(base, f"{name}_io.safetensors"), "np") as fh:
        io = {k: fh.get_tensor(k) for k in fh.keys()}
    return config, os.path.join(base, f"{name}_weights.safetensors"), io


@pytest.fixture(scope="module")
def golden_vae(golden_dir):
    config, weights, io = _golden(golden_dir)
    model = checkpoint.build_and_load(lambda: AutoencoderKL.from_config(config, ms.float32), weights,
                                      dtype=ms.float32, progress=False)
    latents = io["in.latents"]  # (1, 6, z, 2, 3): two chunks of 2 x 3 latent positions
    untiled = model.decode_chunks(Tensor(latents), progress=False).asnumpy()
    return model, latents, untiled, io["out.decoded_unmixed"]


# 1 and (2, 3) divide the 2 x 3 latent evenly; (1, 2) and 2 leave a narrower last column of tiles
@pytest.mark.parametrize("tile", [1, (2, 3), (1, 2), 2])
def test_tiled_decode_matches_untiled_on_golden_weights(golden_vae, tile):
    model, latents, untiled, golden = golden_vae
    tol = VAE_RTOL * (1 + np.abs(golden).max())  # the golden vae case's float32 tolerance
    tiled = model.decode_chunks(Tensor(latents), progress=False, tile_size=tile).asnumpy()
    assert tiled.shape == untiled.shape
    err = np.abs(tiled - untiled).max()
    assert err <= tol, f"tile {tile}: max |tiled - untiled| {err} > {tol}"
    assert np.abs(tiled - golden).max() <= tol
    assert err < 1e-4  # exact up to float summation order: whole-frame statistics, full halos


def test_naive_tiles_would_not_match(golden_vae):
    """What the whole-frame statistics are for: each latent tile decoded on its own (local group-norm
    statistics, zero padding at its edges, its own attention) is far outside the tolerance."""
    model, latents, untiled, golden = golden_vae
    tol = VAE_RTOL * (1 + np.abs(golden).max())
    left = model.decode_chunks(Tensor(latents[..., :1]), progress=False).asnumpy()
    right = model.decode_chunks(Tensor(latents[..., 1:]), progress=False).asnumpy()
    naive = np.concatenate([left, right], axis=-1)
    assert np.abs(naive - untiled).max() > 10 * tol


def test_decode_with_tiles_blends_chunks_like_untiled(golden_vae, golden_dir):
    model, latents, _, _ = golden_vae
    _, _, io = _golden(golden_dir)
    tol = VAE_RTOL * (1 + np.abs(io["out.decoded"]).max())
    frames = model.decode(Tensor(latents), progress=False, tile_size=(1, 2)).asnumpy()
    assert np.abs(frames - io["out.decoded"]).max() <= tol


def test_tiled_decode_with_width_changes():
    """Levels of different widths (the 1x1x1 shortcuts of the released layout) and a 16-channel z."""
    cfg = {"z_channels": 4, "decoder": {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1},
           "encoder": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}}
    model = AutoencoderKL.from_config(cfg)
    rng = np.random.default_rng(0)
    set_small_random_weights(model, rng, 0.1)
    assert model.decoder.up[0].block[0].nin_shortcut is not None
    latents = Tensor(rng.standard_normal((1, 3, 4, 3, 2)).astype(np.float32))
    untiled = model.decode_chunks(latents, progress=False).asnumpy()
    for tile in (1, (2, 1)):
        tiled = model.decode_chunks(latents, progress=False, tile_size=tile).asnumpy()
        assert np.abs(tiled - untiled).max() <= VAE_RTOL * (1 + np.abs(untiled).max()) / 10


def test_tile_grid_and_tile_size_checks():
    assert tile_grid(4, 6, (2, 4)) == [(0, 2, 0, 4), (0, 2, 4, 6), (2, 4, 0, 4), (2, 4, 4, 6)]
    assert tile_grid(3, 3, (5, 5)) == [(0, 3, 0, 3)]
    assert as_tile(3) == (3, 3) and as_tile((1, 2)) == (1, 2)
    for bad in (0, -1, (1,), (1, 0), 1.5, True, "2"):
        with pytest.raises(ValueError, match="tile_size"):
            as_tile(bad)


def test_seam_frame_png(golden_vae, tmp_path):
    """One decoded frame, untiled | tiled at uneven tiles | 20x difference, as a PNG (for the eye);
    the pixel rows and columns on both sides of every tile seam differ from the untiled frame by
    less than one 8-bit level."""
    from PIL import Image

    model, latents, untiled, _ = golden_vae
    tiled = model.decode_chunks(Tensor(latents), progress=False, tile_size=2).asnumpy()
    frame = 8

    def rgb(x):
        return np.clip((x.transpose(1, 2, 0) + 1) * 127.5, 0, 255).round().astype(np.uint8)

    a, b = rgb(untiled[0, frame]), rgb(tiled[0, frame])
    diff = np.clip(np.abs(a.astype(int) - b.astype(int)) * 20, 0, 255).astype(np.uint8)
    Image.fromarray(np.concatenate([a, b, diff], axis=1)).resize((3 * 48 * 4, 32 * 4), Image.NEAREST) \
        .save(tmp_path / "seam.png")
    seam = 32  # tile 2 latent positions = 32 pixels: the seam between columns 31 and 32
    assert np.abs(a[:, seam - 2:seam + 2].astype(int) - b[:, seam - 2:seam + 2].astype(int)).max() <= 1


def test_tiled_decode_under_ascend_sim(golden_dir):
    env = {**os.environ, "GLOG_v": "3", "STEPVIDEO_DEVICE": "ascend-sim", "STEPVIDEO_GOLDEN": golden_dir}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "vae_tiled_sim_checks.py")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tiled decode under ascend-sim: ok" in proc.stdout, proc.stdout


def test_budget_picks_tiles_and_decode_numpy_uses_them(golden_vae):
    from stepvideo_ms.models.vae_config import VAEConfig
    from stepvideo_ms.models.vae_tiled import choose_tile, decode_peak_bytes

    released = VAEConfig()  # 544x992 -> 34x62 latents, bf16: predicted ~51 GiB untiled
    untiled = decode_peak_bytes(released, 34, 62, 2)
    assert decode_peak_bytes(released, 34, 62, 2, 4) < untiled / 3
    assert choose_tile(released, 34, 62, 2, 2 * untiled) is None
    tile = choose_tile(released, 34, 62, 2, 32 * 2 ** 30)
    assert tile is not None and decode_peak_bytes(released, 34, 62, 2, tile) <= 32 * 2 ** 30
    assert decode_peak_bytes(released, 34, 62, 2, (tile[0] + 1,) * 2) > 32 * 2 ** 30  # the largest that fits
    with pytest.raises(ValueError, match="raise the budget"):
        choose_tile(released, 34, 62, 2, 2 ** 30)

    model, latents, untiled_frames, _ = golden_vae
    try:
        model.set_decode_tiling(budget_gb=0.034)  # predicted: 0.13 GiB untiled, 0.032 in 1x1 tiles
        assert model.tile_for(2, 3) == (1, 1)
        frames = model.decode_numpy(latents)
        from stepvideo_ms.serving.services import VaeService

        assert VaeService(model).describe()["decode_tile"] == "when predicted over 0.034 GiB"
        model.set_decode_tiling(tile_size=(1, 2))
        assert model.tile_for(2, 3) == (1, 2)
        assert VaeService(model).describe()["decode_tile"] == "1x2 latent positions"
        model.set_decode_tiling(budget_gb=1e3)
        assert model.tile_for(2, 3) is None
        with pytest.raises(ValueError, match="not both"):
            model.set_decode_tiling(tile_size=1, budget_gb=1.0)
    finally:
        model.set_decode_tiling()
    reference = model.decode_numpy(latents)
    assert np.abs(frames - reference).max() < 1e-4


def test_server_tiling_arguments(tmp_path):
    from stepvideo_ms.serving import main

    (tmp_path / "vae").mkdir()
    base = ["--model_dir", str(tmp_path), "--enable_vae", "True", "--enable_llm", "False"]
    args = main.resolve(main.build_parser().parse_args(base + ["--vae_tile", "4"]))
    assert args.vae_tile == 4 and args.vae_budget_gb is None
    for extra, message in ((["--vae_tile", "0"], "must be >= 1"), (["--vae_budget_gb", "-2"], "must be positive"),
                           (["--vae_tile", "2", "--vae_budget_gb", "8"], "not both")):
        with pytest.raises(SystemExit, match=message):
            main.resolve(main.build_parser().parse_args(base + extra))


def test_a_local_vae_on_a_card_of_known_size_gets_what_the_card_has_left(tmp_path, monkeypatch):
    """--vae_url local, no --vae_tile/--vae_budget_gb, a known card size: the decode's budget is the card less
    rank 0's DiT weights, the runtime reserve and the local models (the planner's figures); none left, or too
    little for any tile, is refused before anything loads."""
    from stepvideo_ms.generation import checks, cli
    from stepvideo_ms.parallel import plan as planner
    from stepvideo_ms.tools.tiny import write_tiny_model

    model = write_tiny_model(str(tmp_path / "model"), seed=0, task="t2v")
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)

    def prepared(*extra):
        args = cli.build_parser().parse_args(["--model_dir", model, "--caption_url", "local", "--vae_url", "local",
                                              "--prompt", "x", "--save_path", str(tmp_path), "--device", "CPU",
                                              "--num_frames", "17", "--height", "48", "--width", "80",
                                              "--ulysses_degree", "1", *extra])
        settings, transformer = checks.validate(args, 1)
        return args, settings, transformer

    args, settings, transformer = prepared()
    checks.fit_local_decode(args, settings, transformer, 1, 64.0, "CPU")
    plan = planner.plan(planner.ModelShape.from_config(json.load(open(os.path.join(transformer, "config.json")))),
                        planner.Layout(1, 1, 1, False), tuple(settings.latent_shape(1)[i] for i in (1, 3, 4)),
                        guidance=True, hardware=planner.CPU)
    held = (plan.memory["weights"] + plan.memory["runtime reserve"]
            + sum(checks.local_backend_parts(args, 4).values())) / planner.GIB
    assert args.vae_budget_gb == pytest.approx(64.0 - held)
    args, settings, transformer = prepared("--local_in_turn")  # the encoders are gone when the VAE decodes
    checks.fit_local_decode(args, settings, transformer, 1, 64.0, "CPU")
    assert args.vae_budget_gb > 64.0 - held
    args, settings, transformer = prepared()
    with pytest.raises(ValueError, match=r"rank 0's card \(.* GiB\) is filled by its DiT weights"):
        checks.fit_local_decode(args, settings, transformer, 1, held / 2, "CPU")
    with pytest.raises(ValueError, match="with the 0.00.* GiB it has left: VAE decode budget"):
        checks.fit_local_decode(args, settings, transformer, 1, held + 1e-6, "CPU")
    args, settings, transformer = prepared("--vae_tile", "2")  # the user's own choice stands
    checks.fit_local_decode(args, settings, transformer, 1, 64.0, "CPU")
    assert args.vae_budget_gb is None and args.vae_tile == 2


def test_the_planner_counts_the_local_decode_when_it_chooses_the_layout(tmp_path, monkeypatch, capsys):
    """No layout given, --vae_url local: the planner checks rank 0's card for the decode after the DiT and
    says the tile it expects (tiny model, CPU float32, 17 frames 256x384: the DiT peaks at 0.08 GiB; the
    decode needs 2.44 GiB untiled, 0.49 GiB in 1-position tiles, 0.80 GiB in 4-position ones)."""
    from stepvideo_ms.generation import checks, cli
    from stepvideo_ms.tools.tiny import write_tiny_model

    model = write_tiny_model(str(tmp_path / "model"), seed=0, task="t2v")
    monkeypatch.setenv("MS_WORKER_NUM", "1")

    def chosen(card_gb):
        args = cli.build_parser().parse_args(["--model_dir", model, "--caption_url", "local", "--vae_url", "local",
                                              "--prompt", "x", "--save_path", str(tmp_path), "--device", "CPU",
                                              "--num_frames", "17", "--height", "256", "--width", "384",
                                              "--card_gb", str(card_gb)])
        checks.validate(args, 1)
        return capsys.readouterr().out

    assert re.search(r"VAE decode in 3\.99 GiB on rank 0: untiled", chosen(4))
    tile = re.search(r"VAE decode in 0\.99 GiB on rank 0: tiles of (\d+)x\1 latent positions", chosen(1))
    assert tile and int(tile.group(1)) >= 4
    with pytest.raises(ValueError, match=r"the VAE decode refused .* with the 0\.29 GiB it has left: .*1-position "
                                         r"tiles need about 0\.49 GiB"):
        chosen(0.3)  # the DiT alone would fit (0.08 GiB): the decode would not
