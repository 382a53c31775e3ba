"""convert.py and the torch-free .bin reader: exact tensors, views, formats, refusals, atomic output."""
import importlib.util
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from stepvideo_ms.formats import bin_convert
from stepvideo_ms.formats.safetensors_io import SafetensorsFile, f32_to_bf16_bits
from stepvideo_ms.formats.torch_bin import ForbiddenGlobalError, TorchBinError, TorchCheckpoint, load_bin
from stepvideo_ms.formats.torch_bin_writer import save_bin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
_spec = importlib.util.spec_from_file_location("convert_cli", os.path.join(REPO, "convert.py"))
convert_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_cli)


def run_cli(*argv):
    """Exit code of convert.py's main, run in this process (output goes to capsys)."""
    try:
        code = convert_cli.main([*argv, "--no_progress"])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return code


def read_back(path):
    f = SafetensorsFile(path)
    return {name: (f.dtype(name), f.get(name, upcast_bf16=False)) for name in f.keys()}, f.metadata


def leftovers(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture()
def golden_bin(golden_dir):
    return os.path.join(golden_dir, "bin", "pytorch_model.bin")


# ----- exact output -------------------------------------------------------------------------------
def test_golden_clip_bin_converts_to_exactly_the_golden_tensors(golden_dir, golden_bin, tmp_path, capsys):
    out = tmp_path / "clip" / "model.safetensors"
    config = os.path.join(golden_dir, "bin", "config.json")
    assert run_cli("--pt_filename", golden_bin, "--sf_filename", str(out), "--config_path", config) == 0
    assert "Conversion successful" in capsys.readouterr().out
    got, metadata = read_back(str(out))
    want, _ = read_back(os.path.join(golden_dir, "clip_weights.safetensors"))
    assert metadata == {"format": "pt"}
    assert sorted(got) == sorted(want)
    for name, (dtype, value) in want.items():
        assert got[name][0] == dtype, name
        assert got[name][1].shape == value.shape, name
        assert np.array_equal(got[name][1], value), name
    with open(tmp_path / "clip" / "config.json", "rb") as a, open(config, "rb") as b:
        assert a.read() == b.read()
    assert leftovers(tmp_path / "clip") == ["config.json", "model.safetensors"]
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    probe = os.umask(0)
    os.umask(probe)
    return probe


@pytest.mark.parametrize("fixture", ["torch_views_zip.bin", "torch_views_legacy.bin"])
def test_shared_storage_views_strides_and_every_dtype(fixture, tmp_path):
    expected = np.load(os.path.join(DATA, "torch_views_expected.npz"))
    out = tmp_path / "views.safetensors"
    assert run_cli("--pt_filename", os.path.join(DATA, fixture), "--sf_filename", str(out)) == 0
    got, _ = read_back(str(out))
    assert sorted(got) == sorted(expected.files)  # shared / tied names all kept
    codes = {"bf16": "BF16", "bf16_t": "BF16", "f16": "F16", "f64": "F64", "i8": "I8", "i16": "I16",
             "i32": "I32", "i64": "I64", "u8": "U8", "flags": "BOOL", "base_t": "F32", "expanded": "F32"}
    for name in expected.files:
        assert got[name][0] == codes.get(name, "F32"), name
        assert got[name][1].shape == expected[name].shape, name
        assert np.array_equal(got[name][1], expected[name]), name


def test_reader_streams_in_chunks_and_matches_whole_reads():
    expected = np.load(os.path.join(DATA, "torch_views_expected.npz"))
    with TorchCheckpoint(os.path.join(DATA, "torch_views_zip.bin")) as ckpt:
        assert ckpt.format == "zip"
        for name in ckpt.keys():
            pieces = [bytes(p) for p in ckpt.chunks(name, chunk_bytes=8)]
            assert all(len(p) <= 8 for p in pieces)
            assert b"".join(pieces) == np.ascontiguousarray(expected[name]).tobytes(), name
    with TorchCheckpoint(os.path.join(DATA, "torch_views_legacy.bin")) as ckpt:
        assert ckpt.format == "legacy"


def test_compressed_zip_records_are_read_too(golden_dir, golden_bin, tmp_path):
    src = tmp_path / "deflated.bin"
    with zipfile.ZipFile(golden_bin) as zin, zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    got = load_bin(str(src))
    want, _ = read_back(os.path.join(golden_dir, "clip_weights.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[name], value) for name, (_, value) in want.items())
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("pytorch_model/data/2")
    data[info.header_offset + 30 + len(info.filename) + 40] ^= 0x55  # inside the deflated bytes
    src.write_bytes(bytes(data))
    with pytest.raises(TorchBinError, match="corrupt"):
        load_bin(str(src))


def test_our_writer_round_trips_all_dtypes_and_big_endian(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((5, 7)).astype(np.float32),
        "bf16": f32_to_bf16_bits(rng.standard_normal((4, 3)).astype(np.float32)),
        "f16": rng.standard_normal(6).astype(np.float16), "f64": rng.standard_normal(2),
        "i64": np.array([-(2**40), 2**40], np.int64), "i32": np.arange(-3, 3, dtype=np.int32),
        "i16": np.array([-7, 7], np.int16), "i8": np.array([-1, 1], np.int8),
        "u8": np.arange(4, dtype=np.uint8), "b": np.array([True, False]), "s": np.array(2.0, np.float32),
    }
    for order in ("little", "big"):
        src = tmp_path / f"{order}.bin"
        save_bin(str(src), tensors, dtypes={"bf16": "bfloat16"}, byteorder=order)
        out = tmp_path / f"{order}.safetensors"
        assert run_cli("--pt_filename", str(src), "--sf_filename", str(out)) == 0
        got, _ = read_back(str(out))
        assert got["bf16"][0] == "BF16"
        for name, value in tensors.items():
            assert got[name][1].dtype == value.dtype and np.array_equal(got[name][1], value), (order, name)


def test_state_dict_key_is_unwrapped_and_unsupported_dtype_is_named(tmp_path, capsys):
    assert sorted(load_bin(os.path.join(DATA, "torch_nested.bin"))) == ["b", "w"]
    assert run_cli("--pt_filename", os.path.join(DATA, "torch_uint16.bin"), "--sf_filename", str(tmp_path / "u.safetensors")) == 1
    err = capsys.readouterr().err
    assert "'u16'" in err and "uint16" in err
    assert leftovers(tmp_path) == []


# ----- damaged and foreign files ------------------------------------------------------------------
def _expect_failure(src, tmp_path, capsys, *needles):
    out_dir = tmp_path / "out" / "nested"
    code = run_cli("--pt_filename", str(src), "--sf_filename", str(out_dir / "model.safetensors"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert str(src) in err
    assert any(n in err for n in needles), err
    assert not (tmp_path / "out").exists()  # no file, and no folder made for the output, is left


@pytest.mark.parametrize("keep", [0.5, 0.99, 1000])
def test_truncated_zip_is_a_clear_error(golden_bin, tmp_path, capsys, keep):
    data = open(golden_bin, "rb").read()
    src = tmp_path / "cut.bin"
    src.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    _expect_failure(src, tmp_path, capsys, "truncated")


@pytest.mark.parametrize("keep", [300, -10])
def test_truncated_legacy_file_is_a_clear_error(tmp_path, capsys, keep):
    data = open(os.path.join(DATA, "torch_views_legacy.bin"), "rb").read()
    src = tmp_path / "cut.bin"
    src.write_bytes(data[:keep])
    _expect_failure(src, tmp_path, capsys, "truncated")


def test_corrupt_storage_bytes_fail_their_checksum(golden_bin, tmp_path, capsys):
    data = bytearray(open(golden_bin, "rb").read())
    with zipfile.ZipFile(golden_bin) as zf:
        info = zf.getinfo("pytorch_model/data/20")  # a late storage: earlier tensors are written first
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 5] ^= 0xFF
    src = tmp_path / "corrupt.bin"
    src.write_bytes(bytes(data))
    _expect_failure(src, tmp_path, capsys, "CRC-32")


def test_corrupt_pickle_and_foreign_files_are_clear_errors(golden_bin, tmp_path, capsys):
    data = bytearray(open(golden_bin, "rb").read())
    pos = data.index(b"embeddings.LayerNorm.bias")
    data[pos:pos + 4] = b"\xff\xfe\xfd\xfc"
    (tmp_path / "pkl.bin").write_bytes(bytes(data))
    _expect_failure(tmp_path / "pkl.bin", tmp_path, capsys, "corrupt")
    (tmp_path / "text.bin").write_text("hello, not a checkpoint\n")
    _expect_failure(tmp_path / "text.bin", tmp_path, capsys, "not a PyTorch checkpoint")
    (tmp_path / "empty.bin").write_bytes(b"")
    _expect_failure(tmp_path / "empty.bin", tmp_path, capsys, "empty")
    (tmp_path / "plain.bin").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    _expect_failure(tmp_path / "plain.bin", tmp_path, capsys, "not a PyTorch checkpoint")
    _torch_zip(tmp_path / "list.bin", pickle.dumps([1, 2], protocol=2))
    _expect_failure(tmp_path / "list.bin", tmp_path, capsys, "not a state dict")


# ----- refusing code ------------------------------------------------------------------------------
def _torch_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")


def _legacy(path, payload: bytes):
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}))
    path.write_bytes(head + payload)


class _OpensFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


class _RunsShell:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pickle_that_would_write_a_file_is_refused_and_nothing_runs(tmp_path, capsys, layout):
    sentinel = tmp_path / "pwned.txt"
    payload = pickle.dumps({"weight": _OpensFile(str(sentinel))}, protocol=2)
    pickle.loads(payload)["weight"].close()  # the payload is live: plain unpickling creates the file
    assert sentinel.exists()
    sentinel.unlink()
    src = tmp_path / "evil.bin"
    (_torch_zip if layout == "zip" else _legacy)(src, payload)
    with pytest.raises(ForbiddenGlobalError, match=r"'(io|builtins)\.open'"):
        TorchCheckpoint(str(src))
    _expect_failure(src, tmp_path, capsys, "refused")
    assert not sentinel.exists()


def test_shell_command_and_near_miss_globals_are_refused(tmp_path):
    sentinel = tmp_path / "touched"
    cases = {
        "shell": pickle.dumps(_RunsShell(str(sentinel)), protocol=2),
        "counter": b"\x80\x02ccollections\nCounter\n)R.",  # admitted module, other name
        "torch_numpy": b"\x80\x02ctorch._utils\n_rebuild_device_tensor_from_numpy\n)R.",
        "eval_in_args": b"\x80\x02}X\x01\x00\x00\x00wcbuiltins\neval\nX\x04\x00\x00\x001+1\x85Rs.",
    }
    for label, payload in cases.items():
        src = tmp_path / f"{label}.bin"
        _torch_zip(src, payload)
        with pytest.raises(ForbiddenGlobalError) as info:
            TorchCheckpoint(str(src))
        assert "nothing in the file was run" in str(info.value), label
        if label == "shell":
            assert "'posix.system'" in str(info.value)
    assert not sentinel.exists()


def test_state_cannot_be_set_on_the_rebuild_stand_ins(tmp_path):
    src = tmp_path / "build.bin"
    _torch_zip(src, b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x02\x00\x00\x00fnK\x01sb.")
    with pytest.raises(TorchBinError, match="corrupt"):
        TorchCheckpoint(str(src))


# ----- arguments, existing outputs, config --------------------------------------------------------
def test_argument_errors_name_the_argument(golden_bin, tmp_path, capsys):
    assert run_cli() == 2
    assert "--pt_filename" in capsys.readouterr().err
    assert run_cli("--pt_filename", golden_bin, "--pt_dir", str(tmp_path)) == 2
    assert "either --pt_filename" in capsys.readouterr().err
    assert run_cli("--pt_filename", golden_bin, "--sf_filename", str(tmp_path / "x.bin")) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert run_cli("--pt_dir", str(tmp_path), "--sf_filename", str(tmp_path / "x.safetensors")) == 2
    assert "--sf_dir" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert run_cli("--pt_filename", golden_bin, "--sf_filename", str(tmp_path / "afile" / "m.safetensors")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert leftovers(tmp_path) == ["afile"]


def test_missing_input_is_named(tmp_path, capsys):
    assert run_cli("--pt_filename", str(tmp_path / "nope.bin")) == 2
    err = capsys.readouterr().err
    assert "--pt_filename" in err and "does not exist" in err


def test_existing_output_needs_overwrite_and_is_kept_otherwise(golden_bin, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    assert run_cli("--pt_filename", golden_bin, "--sf_filename", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert run_cli("--pt_filename", golden_bin, "--sf_filename", str(out), "--overwrite") == 0
    assert len(read_back(str(out))[0]) == 39


def test_config_path_checks(golden_dir, golden_bin, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    (tmp_path / "bad.json").write_text("{not json")
    assert run_cli("--pt_filename", golden_bin, "--sf_filename", str(out), "--config_path", str(tmp_path / "bad.json")) == 2
    assert "--config_path" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"other": 1}')
    config = os.path.join(golden_dir, "bin", "config.json")
    assert run_cli("--pt_filename", golden_bin, "--sf_filename", str(out), "--config_path", config) == 2
    assert "differs" in capsys.readouterr().err
    assert not out.exists()
    # the config already in place (the usual call, all three paths in one folder) is left alone
    shutil.copy(golden_bin, tmp_path / "pytorch_model.bin")
    assert run_cli("--pt_filename", str(tmp_path / "pytorch_model.bin"), "--config_path", str(tmp_path / "config.json")) == 0
    assert (tmp_path / "config.json").read_text() == '{"other": 1}'
    assert out.exists()  # the default output name beside pytorch_model.bin


# ----- directory mode -----------------------------------------------------------------------------
def _sharded(folder):
    rng = np.random.default_rng(1)
    shards = {
        "pytorch_model-00001-of-00002.bin": {"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
                                             "a.bias": rng.standard_normal(3).astype(np.float32)},
        "pytorch_model-00002-of-00002.bin": {"b.weight": f32_to_bf16_bits(rng.standard_normal((2, 2)).astype(np.float32))},
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_bin(str(folder / name), tensors, dtypes={"b.weight": "bfloat16"})
    weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return shards


def test_sharded_directory_converts_with_an_index(tmp_path):
    from stepvideo_ms.formats.checkpoint import checkpoint_files

    shards = _sharded(tmp_path / "pt")
    assert run_cli("--pt_dir", str(tmp_path / "pt"), "--sf_dir", str(tmp_path / "sf")) == 0
    assert leftovers(tmp_path / "sf") == ["config.json", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "sf" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a.bias": "model-00001-of-00002.safetensors", "a.weight": "model-00001-of-00002.safetensors",
                                   "b.weight": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == (12 + 3) * 4 + 4 * 2
    assert [os.path.basename(p) for p in checkpoint_files(str(tmp_path / "sf"))] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, tensors in shards.items():
        got, _ = read_back(str(tmp_path / "sf" / bin_convert.safetensors_name(name)))
        for key, value in tensors.items():
            assert np.array_equal(got[key][1], value), key
    assert got["b.weight"][0] == "BF16"


def test_sharded_directory_with_a_wrong_index_writes_nothing(tmp_path, capsys):
    _sharded(tmp_path / "pt")
    index = tmp_path / "pt" / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["a.bias"] = "pytorch_model-00002-of-00002.bin"
    index.write_text(json.dumps(data))
    assert run_cli("--pt_dir", str(tmp_path / "pt")) == 2
    assert "does not match" in capsys.readouterr().err
    assert not any(f.endswith(".safetensors") or f.endswith(".partial") for f in leftovers(tmp_path / "pt"))


def test_sharded_directory_failing_late_leaves_no_shard(tmp_path, capsys):
    _sharded(tmp_path / "pt")
    second = tmp_path / "pt" / "pytorch_model-00002-of-00002.bin"
    data = bytearray(second.read_bytes())
    with zipfile.ZipFile(second) as zf:
        info = zf.getinfo("pytorch_model-00002-of-00002/data/0")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra)] ^= 0xFF
    second.write_bytes(bytes(data))
    assert run_cli("--pt_dir", str(tmp_path / "pt"), "--sf_dir", str(tmp_path / "sf" / "deep")) == 1
    assert "CRC-32" in capsys.readouterr().err
    assert not (tmp_path / "sf").exists()
    inputs = leftovers(tmp_path / "pt")
    assert run_cli("--pt_dir", str(tmp_path / "pt")) == 1
    assert leftovers(tmp_path / "pt") == inputs


def test_directory_without_index_converts_each_bin_beside_it(golden_bin, tmp_path):
    shutil.copy(golden_bin, tmp_path / "pytorch_model.bin")
    assert run_cli("--pt_dir", str(tmp_path)) == 0
    assert leftovers(tmp_path) == ["model.safetensors", "pytorch_model.bin"]


def test_verification_catches_a_changed_byte(golden_bin, tmp_path):
    with TorchCheckpoint(golden_bin) as ckpt:
        entries = bin_convert._layout(ckpt)
        with bin_convert._progress_bar(0, "", False) as bar:
            crcs = bin_convert._write(ckpt, entries, str(tmp_path / "t.safetensors"), bar)
    data = bytearray((tmp_path / "t.safetensors").read_bytes())
    data[-3] ^= 1
    (tmp_path / "t.safetensors").write_bytes(bytes(data))
    with pytest.raises(bin_convert.ConvertError, match="differ from what was written"):
        bin_convert._verify(str(tmp_path / "t.safetensors"), "t", entries, crcs)


def test_command_line_runs_without_torch(golden_bin, tmp_path):
    code = ("import runpy, sys; sys.argv = ['convert.py', '--pt_filename', sys.argv[1], '--sf_filename', sys.argv[2], "
            "'--no_progress']\ntry:\n    runpy.run_path('convert.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nassert 'torch' not in sys.modules and 'mindspore' not in sys.modules")
    out = tmp_path / "m.safetensors"
    proc = subprocess.run([sys.executable, "-c", code, golden_bin, str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    help_text = subprocess.run([sys.executable, "convert.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    for flag in ("--pt_filename", "--sf_filename", "--config_path", "--pt_dir", "--sf_dir", "--overwrite"):
        assert flag in help_text
