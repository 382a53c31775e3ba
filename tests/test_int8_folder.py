"""convert.py --quantize int8: the int8 transformer folder (released layout, scales beside their
weights, recorded in config.json and metadata, atomic, verified) and the loaders reading it."""
import json
import os

import numpy as np
import pytest
import mindspore as ms

import convert
from stepvideo_ms.formats import checkpoint
from stepvideo_ms.tools import tiny
from stepvideo_ms.models.dit import StepVideoModel
from stepvideo_ms.models.int8_folder import QuantizeError, int8_weight_names, quantize_folder
from stepvideo_ms.ops.quant import CONFIG_KEY, SCALE_SUFFIX, quantize_rows
from stepvideo_ms.formats.safetensors_io import SafetensorsFile, bf16_to_f32


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny transformer folder in the released layout: config.json, 2 shards, the index."""
    root = tmp_path_factory.mktemp("int8src")
    folder = str(root / "model" / "transformer")
    tiny.write_transformer(folder, seed=5, task="t2v", in_channels=8, caption_channels=[64, 32])
    return folder


@pytest.fixture(scope="module")
def converted(source):
    out = os.path.join(os.path.dirname(source), "transformer_int8")
    assert convert.main(["--quantize", "int8", "--model_dir", os.path.dirname(source), "--no_progress"]) == 0
    return out


def params(model):
    return {n: p.asnumpy() for n, p in model.parameters_and_names()}


def test_the_folder_keeps_the_released_layout_with_scales_beside_their_weights(source, converted):
    src_files = sorted(os.listdir(source))
    assert sorted(os.listdir(converted)) == src_files  # same shards, index and config.json
    config = checkpoint.read_config(converted)
    assert config[CONFIG_KEY]["weights"] == "int8"
    index = json.load(open(os.path.join(converted, tiny.DIT_INDEX)))
    names = int8_weight_names(config)
    assert names and all(n.startswith("transformer_blocks.") for n in names)
    for shard in tiny.DIT_SHARDS:
        out, src = SafetensorsFile(os.path.join(converted, shard)), SafetensorsFile(os.path.join(source, shard))
        assert out.metadata["stepvideo_ms.weights"] == "int8"
        for key in src.keys():
            assert index["weight_map"][key] == shard
            if key in names:
                assert out.dtype(key) == "I8" and out.dtype(key + SCALE_SUFFIX) == "BF16"
                assert index["weight_map"][key + SCALE_SUFFIX] == shard  # the scales sit in the weight's shard
                q, s = quantize_rows(src.get(key))
                np.testing.assert_array_equal(out.get(key), q)
                np.testing.assert_array_equal(out.get(key + SCALE_SUFFIX), s)
            else:  # copied byte for byte
                assert out.dtype(key) == src.dtype(key)
                assert out.get(key, upcast_bf16=False).tobytes() == src.get(key, upcast_bf16=False).tobytes()


def test_the_int8_folder_loads_as_the_released_one_quantized_while_loading(source, converted):
    on_the_fly = StepVideoModel.from_pretrained(source, progress=False, weights="int8")
    stored = StepVideoModel.from_pretrained(converted, progress=False)  # detected from config.json
    assert stored.weights == "int8"
    a, b = params(on_the_fly), params(stored)
    assert a.keys() == b.keys() and any(v.dtype == np.int8 for v in a.values())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_sharded_slices_from_either_folder_are_the_same(source, converted):
    from stepvideo_ms.parallel import Mesh
    from stepvideo_ms.parallel.shard import load_sharded_stage

    for rank in range(2):
        mesh = Mesh.create(2, rank, 2, 1, shard_weights=True)
        _, from_bf = load_sharded_stage(source, mesh, ms.float32, progress=False, weights="int8")
        _, from_q = load_sharded_stage(converted, mesh, ms.float32, progress=False)
        assert [g.names for g in from_bf.layouts] == [g.names for g in from_q.layouts]
        for layer in from_bf.flats:
            for x, y in zip(from_bf.flats[layer], from_q.flats[layer]):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x.asnumpy(), y.asnumpy())


def test_offloaded_host_blocks_from_either_folder_are_the_same(source, converted):
    """--offload --weights int8: the host blocks hold int8 weights and their scales, read from the int8
    folder or quantized while reading the released one, byte for byte the same."""
    from stepvideo_ms.parallel import Mesh
    from stepvideo_ms.parallel.offload import load_offloaded_stage

    mesh = Mesh.create(1, 0, offload=True)
    _, from_bf = load_offloaded_stage(source, mesh, ms.float32, progress=False, weights="int8")
    _, from_q = load_offloaded_stage(converted, mesh, ms.float32, progress=False)
    _, full = load_offloaded_stage(source, mesh, ms.float32, progress=False, weights="full")
    assert from_bf.layout == from_q.layout and from_bf.layers == from_q.layers
    names = from_bf.layout.names
    assert any(n.endswith(SCALE_SUFFIX) for n in names)
    for layer in from_bf.layers:
        for name, x, y in zip(names, from_bf.blocks[layer], from_q.blocks[layer]):
            assert x.dtype == y.dtype and (x.dtype == np.int8) == (name + SCALE_SUFFIX in names), name
            np.testing.assert_array_equal(x, y, err_msg=name)
    # int8 weights take 1 byte where the CPU map keeps float32: well under half the full blocks' bytes
    assert from_bf.nbytes() < 0.5 * full.nbytes(), (from_bf.nbytes(), full.nbytes())


def test_full_weights_cannot_come_from_an_int8_folder(converted):
    with pytest.raises(ValueError, match="--weights full"):
        StepVideoModel.from_pretrained(converted, progress=False, weights="full")
    config = {k: v for k, v in checkpoint.read_config(converted).items() if k != CONFIG_KEY}
    with pytest.raises(checkpoint.CheckpointError, match="int8"):  # a config that lost its record
        StepVideoModel.from_pretrained(converted, config=config, progress=False)


def test_refusals_leave_nothing_behind(source, converted, tmp_path, monkeypatch, capsys):
    model_dir = os.path.dirname(source)
    with pytest.raises(SystemExit) as exit_:  # exists: no silent overwrite
        convert.main(["--quantize", "int8", "--model_dir", model_dir, "--no_progress"])
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(QuantizeError, match="int8 weights already"):
        quantize_folder(converted, str(tmp_path / "again"), progress=False)
    with pytest.raises(SystemExit):
        convert.main(["--quantize", "int8", "--pt_dir", model_dir, "--model_dir", model_dir])
    from stepvideo_ms.models import int8_folder

    def broken(path, crcs, quantize):
        raise QuantizeError("verification failed (test)")

    monkeypatch.setattr(int8_folder, "_verify", broken)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(QuantizeError, match="verification"):
        quantize_folder(source, str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary folder


def test_bf16_weights_halve_on_disk(golden_dir, tmp_path):
    src = tmp_path / "transformer"
    src.mkdir()
    weights = os.path.join(golden_dir, "bf16", "dit_t2v_bf16_weights.safetensors")
    config = json.loads(SafetensorsFile(weights).metadata["config"])
    (src / "config.json").write_text(json.dumps(config))
    (src / "diffusion_pytorch_model.safetensors").symlink_to(weights)
    report = quantize_folder(str(src), str(tmp_path / "int8"), progress=False)
    names = int8_weight_names(config)
    f = SafetensorsFile(weights)
    block = sum(int(np.prod(f.shape(k))) for k in names)
    assert report.bytes_in - report.bytes_out >= block - 2 * sum(f.shape(k)[0] for k in names) - 4096
    out = SafetensorsFile(str(tmp_path / "int8" / "diffusion_pytorch_model.safetensors"))
    for key in names:  # quantized from the bf16 values, which are exact in float32
        q, s = quantize_rows(bf16_to_f32(f.get(key, upcast_bf16=False)))
        np.testing.assert_array_equal(out.get(key), q)


def test_uneven_row_cuts_gather_back_to_the_full_int8_blocks(tmp_path, monkeypatch):
    """3 ranks holding different numbers of rows (the DiT's shapes split evenly, so the cut is moved by one
    row): each rank reads only its rows (and derives their scales), and the gathered working block
    equals the block of the single-process int8 model."""
    from mindspore import mint
    from stepvideo_ms.parallel import Mesh, shard
    from stepvideo_ms.parallel.shard import BlockGatherer, BlockLayout, load_sharded_stage
    from stepvideo_ms.formats.safetensors_io import save_file_atomic

    balanced = shard.cut_rows

    def one_row_off(layouts, parts):
        weights, scales, rest = balanced(layouts, parts)
        rows = list(scales.bounds)
        rows[1] -= 1
        ends = np.concatenate([[0], np.cumsum([c for r, c in weights.shapes for _ in range(r)])])
        return (BlockLayout(weights.names, weights.shapes, tuple(int(ends[r]) for r in rows)),
                BlockLayout(scales.names, scales.shapes, tuple(rows)), rest)

    monkeypatch.setattr(shard, "cut_rows", one_row_off)

    config = {"num_attention_heads": 3, "attention_head_dim": 16, "num_layers": 2, "in_channels": 4,
              "out_channels": 4, "caption_channels": [24, 8]}
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    state = tiny.random_state(StepVideoModel.from_config(config), 1, "uneven")
    save_file_atomic(state, str(folder / "diffusion_pytorch_model.safetensors"))
    full = StepVideoModel.from_pretrained(str(folder), progress=False, weights="int8")
    loaded = [load_sharded_stage(str(folder), Mesh.create(3, r, 3, 1, shard_weights=True), ms.float32, False, "int8")
              for r in range(3)]
    int8_layout = loaded[0][1].layouts[0]
    sizes = {b - a for a, b in zip(int8_layout.bounds[:-1], int8_layout.bounds[1:])}
    assert len(sizes) > 1, "the cut should be uneven here"

    class AllRanks:  # all_gather of the 3 ranks' slices of the tensor this rank passes
        lockstep, rank = True, 0

        def all_gather(self, x, group, axis=0):
            for layer, flats in loaded[0][1].flats.items():
                for g, flat in enumerate(flats):
                    if flat is x:
                        return mint.cat([loaded[r][1].flats[layer][g] for r in range(3)])
            raise AssertionError("unknown tensor")

    gatherer = BlockGatherer(AllRanks(), (0, 1, 2), loaded[0][1], loaded[0][0], [0, 1])
    for layer in (0, 1):
        got = dict(gatherer.block(layer).parameters_and_names())
        for name, want in full.transformer_blocks[layer].parameters_and_names():
            assert got[name].dtype == want.dtype
            np.testing.assert_array_equal(got[name].asnumpy(), want.asnumpy(), err_msg=f"{layer} {name}")
