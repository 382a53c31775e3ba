"""`python -m stepvideo_ms compare`: identical videos give infinite PSNR and SSIM 1; a known perturbation
gives the PSNR computed by hand; MP4s written by the pipeline's writer are read back and compared."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from stepvideo_ms.tools.compare import compare_frames, main, read_frames
from stepvideo_ms.video import write_mp4


def frames(seed=0, shape=(3, 32, 48, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_identical_videos_give_infinite_psnr_and_ssim_one():
    a = frames()
    result = compare_frames(a, a.copy())
    assert result["psnr"] == [math.inf] * 3 and result["mean_psnr"] == math.inf
    assert result["ssim"] == [1.0] * 3 and result["mean_ssim"] == 1.0


def test_known_perturbation_gives_the_psnr_by_hand(tmp_path):
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[0, :8] += 10  # half of frame 0 off by 10: MSE 50
    b[1] += 4       # all of frame 1 off by 4: MSE 16
    result = compare_frames(a, b)
    assert result["psnr"][0] == pytest.approx(10 * math.log10(255 ** 2 / 50), abs=1e-9)
    assert result["psnr"][1] == pytest.approx(10 * math.log10(255 ** 2 / 16), abs=1e-9)
    assert result["ssim"][0] < 1.0 and result["ssim"][1] < 1.0
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    done = subprocess.run([sys.executable, "-m", "stepvideo_ms", "compare", str(tmp_path / "a.npy"),
                           str(tmp_path / "b.npy"), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["psnr"] == pytest.approx(result["psnr"]) and printed["mean_ssim"] == pytest.approx(result["mean_ssim"])


def test_mp4_files_and_the_printed_table(tmp_path, capsys):
    a = frames(1, (4, 32, 48, 3))
    write_mp4(a, str(tmp_path / "a.mp4"))
    write_mp4(np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8), str(tmp_path / "b.mp4"))
    assert read_frames(str(tmp_path / "a.mp4")).shape == a.shape
    assert main([str(tmp_path / "a.mp4"), str(tmp_path / "a.mp4")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].split() == ["mean", "inf", "1.0000"]
    assert main([str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]) == 0
    mean = capsys.readouterr().out.splitlines()[-1].split()
    assert 5 < float(mean[1]) < 40 and float(mean[2]) < 1


def test_bad_inputs_name_the_file(tmp_path, capsys):
    np.save(tmp_path / "a.npy", frames())
    np.save(tmp_path / "short.npy", frames(shape=(2, 32, 48, 3)))
    assert main([str(tmp_path / "a.npy"), str(tmp_path / "missing.mp4")]) == 2
    assert "missing.mp4: no such file" in capsys.readouterr().err
    assert main([str(tmp_path / "a.npy"), str(tmp_path / "short.npy")]) == 2
    assert "differ in shape" in capsys.readouterr().err
    np.save(tmp_path / "f.npy", np.zeros((2, 4, 4), np.float32))
    assert main([str(tmp_path / "a.npy"), str(tmp_path / "f.npy")]) == 2
    assert "expected (frames, height, width, 3) uint8" in capsys.readouterr().err
