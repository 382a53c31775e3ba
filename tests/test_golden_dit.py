"""The DiT and the denoising loop against the upstream PyTorch outputs (../shared/golden)."""
import pytest

from stepvideo_ms.tools import verify


@pytest.mark.parametrize("case", ["dit_t2v", "dit_ti2v", "sampler"])
def test_verify_case_passes(golden_dir, case, capsys):
    assert verify.main(["--golden", golden_dir, "--case", case]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith(case)][0]
    assert "PASS" in line


def test_verify_fails_on_a_wrong_golden_output(golden_dir, tmp_path, capsys):
    """A perturbed output must be reported as FAIL with a non-zero exit: the check can fail."""
    import numpy as np
    from stepvideo_ms.formats.safetensors_io import SafetensorsFile, load_file, save_file_atomic

    io = load_file(f"{golden_dir}/dit_t2v_io.safetensors")
    meta = SafetensorsFile(f"{golden_dir}/dit_t2v_io.safetensors").metadata
    io["out"] = io["out"] + np.float32(0.01) * (1 + np.abs(io["out"]).max())
    save_file_atomic(io, str(tmp_path / "dit_t2v_io.safetensors"), meta)
    (tmp_path / "dit_t2v_weights.safetensors").symlink_to(f"{golden_dir}/dit_t2v_weights.safetensors")
    assert verify.main(["--golden", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_runs_any_directory_and_any_case_name_of_a_known_kind(golden_dir, tmp_path, capsys):
    for part in ("weights", "io"):
        (tmp_path / f"dit_ti2v_renamed_{part}.safetensors").symlink_to(f"{golden_dir}/dit_ti2v_{part}.safetensors")
    (tmp_path / "mystery_io.safetensors").write_bytes(b"")
    (tmp_path / "mystery_weights.safetensors").write_bytes(b"")
    assert verify.main(["--golden", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dit_ti2v_renamed" in out and "PASS" in out
    assert "mystery" in out and "SKIP" in out


def test_verify_with_no_case_is_an_error(tmp_path):
    assert verify.main(["--golden", str(tmp_path)]) == 2
