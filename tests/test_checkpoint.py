"""The checkpoint loader: layouts, strict names and shapes, missing shards, dtype policy."""
import json

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from stepvideo_ms.formats import checkpoint
from stepvideo_ms.formats.checkpoint import CheckpointError
from stepvideo_ms.models.common import Linear
from stepvideo_ms.formats.safetensors_io import SafetensorsError, f32_to_bf16_bits, save_file_atomic


class Tiny(nn.Cell):
    def __init__(self):
        super().__init__()
        self.a = Linear(3, 2)
        self.blocks = nn.CellList([Linear(2, 2, bias=False), Linear(2, 2, bias=False)])


def weights():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.standard_normal((2, 3)).astype(np.float32),
            "a.bias": rng.standard_normal(2).astype(np.float32),
            "blocks.0.weight": rng.standard_normal((2, 2)).astype(np.float32),
            "blocks.1.weight": rng.standard_normal((2, 2)).astype(np.float32)}


def write_sharded(folder, tensors, prefix="diffusion_pytorch_model"):
    names = sorted(tensors)
    shards = {f"{prefix}-00001-of-00002.safetensors": names[:2], f"{prefix}-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file_atomic({k: tensors[k] for k in keys}, str(folder / shard))
        weight_map.update({k: shard for k in keys})
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_loads_single_file_and_sharded_directory(tmp_path):
    w = weights()
    save_file_atomic(w, str(tmp_path / "one.safetensors"))
    m = Tiny()
    checkpoint.load_into(m, str(tmp_path / "one.safetensors"), progress=False)
    np.testing.assert_array_equal(m.blocks[1].weight.asnumpy(), w["blocks.1.weight"])
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    write_sharded(shard_dir, w)
    m2 = Tiny()
    loaded = checkpoint.load_into(m2, str(shard_dir), progress=False)
    assert set(loaded) == set(w)
    np.testing.assert_array_equal(m2.a.bias.asnumpy(), w["a.bias"])


def test_missing_key_is_listed(tmp_path):
    w = weights()
    del w["blocks.1.weight"]
    save_file_atomic(w, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.weight"):
        checkpoint.load_into(Tiny(), str(tmp_path / "m.safetensors"), progress=False)


def test_extra_key_is_listed(tmp_path):
    w = weights()
    w["blocks.2.weight"] = np.zeros((2, 2), np.float32)
    save_file_atomic(w, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks\.2\.weight"):
        checkpoint.load_into(Tiny(), str(tmp_path / "m.safetensors"), progress=False)


def test_wrong_shape_is_named_and_nothing_is_loaded(tmp_path):
    w = weights()
    w["a.weight"] = np.zeros((3, 2), np.float32)
    save_file_atomic(w, str(tmp_path / "m.safetensors"))
    m = Tiny()
    with pytest.raises(CheckpointError, match=r"a\.weight: checkpoint \(3, 2\) vs model \(2, 3\)"):
        checkpoint.load_into(m, str(tmp_path / "m.safetensors"), progress=False)
    assert not np.any(m.a.bias.asnumpy())  # checked before any tensor was set


def test_missing_shard_is_named(tmp_path):
    write_sharded(tmp_path, weights())
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*00002-of-00002"):
        checkpoint.load_into(Tiny(), str(tmp_path), progress=False)


def test_empty_and_absent_locations(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        checkpoint.load_into(Tiny(), str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_into(Tiny(), str(tmp_path / "nope"), progress=False)


def test_truncated_file_is_reported(tmp_path):
    save_file_atomic(weights(), str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-5])
    with pytest.raises(SafetensorsError, match="truncated or corrupt"):
        checkpoint.load_into(Tiny(), str(tmp_path / "m.safetensors"), progress=False)


def test_select_loads_only_a_stage_and_ignores_other_keys(tmp_path):
    save_file_atomic(weights(), str(tmp_path / "m.safetensors"))
    m = Tiny()
    loaded = checkpoint.load_into(m, str(tmp_path / "m.safetensors"), progress=False,
                                  select=lambda n: not n.startswith("blocks.1."))
    assert "blocks.1.weight" not in loaded and "blocks.0.weight" in loaded


def test_bf16_checkpoint_is_cast_to_the_policy_dtype(tmp_path):
    from stepvideo_ms.formats.safetensors_io import bf16_to_f32
    w = weights()
    raw = {k: v for k, v in w.items()}
    # write a BF16 file by hand: the safetensors numpy API has no bfloat16
    header, blobs, offset = {}, [], 0
    for k in sorted(raw):
        b = f32_to_bf16_bits(raw[k]).tobytes()
        header[k] = {"dtype": "BF16", "shape": list(raw[k].shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    hj = json.dumps(header).encode()
    (tmp_path / "bf16.safetensors").write_bytes(len(hj).to_bytes(8, "little") + hj + b"".join(blobs))
    m = Tiny()
    checkpoint.load_into(m, str(tmp_path / "bf16.safetensors"), progress=False)
    assert m.a.weight.dtype == ms.float32
    np.testing.assert_array_equal(m.a.weight.asnumpy(), bf16_to_f32(f32_to_bf16_bits(w["a.weight"])))
    np.testing.assert_allclose(m.a.weight.asnumpy(), w["a.weight"], rtol=1e-2)
