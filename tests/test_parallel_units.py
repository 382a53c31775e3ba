"""The parallel library without msrun: mesh layout and its errors, layer partitions, the schedule,
token shards, stage loading, and the whole loop in a world of one."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from parallel_cases import (GUIDANCE, STEPS, TIME_SHIFT, Case, case_inputs, conditioning, reference_latents,
                            tolerance, write_model)
from stepvideo_ms import ops
from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler
from stepvideo_ms.models.dit import StepVideoModel
from stepvideo_ms.parallel import (LocalCommunicator, Mesh, Schedule, TokenShard, UlyssesAttention, layer_partition,
                                   load_stage_model, make_communicator, micro_batch_count, parallel_denoise,
                                   stage_param_filter)
from stepvideo_ms.parallel.comm import merge_from_front, split_to_front


# ---- mesh -------------------------------------------------------------------------------------
def test_mesh_layout_groups_consecutive_ranks_per_stage():
    meshes = [Mesh.create(8, r, ulysses_degree=2, pp_degree=4) for r in range(8)]
    assert [m.stage for m in meshes] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [m.sp_rank for m in meshes] == [0, 1] * 4
    assert meshes[5].sp_group == (4, 5)
    assert meshes[5].column == (1, 3, 5, 7)
    assert meshes[0].is_first_stage and not meshes[0].is_last_stage and meshes[7].is_last_stage
    assert Mesh.create(1, 0).sp_group == (0,) and Mesh.create(1, 0).column == (0,)


@pytest.mark.parametrize("args, match", [
    (dict(world_size=4, rank=0, ulysses_degree=3, pp_degree=1), r"ulysses_degree=3 x pp_degree=1 .*world size 4.*--ulysses_degree 2 --pp_degree 2"),
    (dict(world_size=4, rank=0, ulysses_degree=2, pp_degree=1), r"must equal the world size 4"),
    (dict(world_size=2, rank=0, ulysses_degree=0, pp_degree=2), r"ulysses_degree=0 must be at least 1"),
    (dict(world_size=2, rank=2, ulysses_degree=2, pp_degree=1), r"rank=2 is outside"),
    (dict(world_size=4, rank=0, ulysses_degree=4, pp_degree=1, ring_degree=2), r"ring_degree=2 .*--ring_degree 1"),
    (dict(world_size=4, rank=0, ulysses_degree=2, pp_degree=2, pp_split="1,2"), r"pp_split=1,2 gives 3 stages but pp_degree=2"),
    (dict(world_size=2, rank=0, ulysses_degree=1, pp_degree=2, pp_split="a"), r"pp_split='a'"),
])
def test_mesh_refuses_bad_layouts_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        Mesh.create(**args)


def test_mesh_cfg_replicas_and_shard_groups():
    meshes = [Mesh.create(8, r, ulysses_degree=2, pp_degree=2, cfg_degree=2, shard_weights=True) for r in range(8)]
    assert [m.cfg_rank for m in meshes] == [0] * 4 + [1] * 4
    assert [m.stage for m in meshes] == [0, 0, 1, 1] * 2
    assert [m.sp_rank for m in meshes] == [0, 1] * 4
    assert meshes[6].sp_group == (6, 7) and meshes[6].column == (4, 6) and meshes[6].replica_ranks == (4, 5, 6, 7)
    assert meshes[6].cfg_group == (2, 6)
    assert meshes[6].shard_group == (2, 3, 6, 7) and meshes[6].shard_index == 2  # the stage's ranks, both replicas
    assert meshes[1].shard_group == (0, 1, 4, 5)
    assert Mesh.create(2, 1, 2, 1).shard_group == (1,)  # without sharding every rank holds its whole stage
    assert "cfg rank 1/2" in meshes[6].describe() and "weights 1/4" in meshes[6].describe()


@pytest.mark.parametrize("args, match", [
    (dict(world_size=4, rank=0, ulysses_degree=2, cfg_degree=3), r"cfg_degree=3 must be 1 or 2.*--cfg_degree 2"),
    (dict(world_size=4, rank=0, ulysses_degree=4, cfg_degree=2),
     r"cfg_degree=2 x ulysses_degree=4 x pp_degree=1 = 8 must equal the world size 4.*--cfg_degree 2 --ulysses_degree 2 --pp_degree 1"),
    (dict(world_size=2, rank=0, pp_degree=2, shard_weights=True), r"shard_weights.*cfg_degree=1 x ulysses_degree=1 = 1"),
    (dict(world_size=1, rank=0, shard_weights=True), r"drop --shard_weights"),
])
def test_mesh_refuses_bad_cfg_and_shard_layouts(args, match):
    with pytest.raises(ValueError, match=match):
        Mesh.create(**args)


def test_model_checks_name_heads_and_layers_with_a_valid_alternative():
    with pytest.raises(ValueError, match=r"ulysses_degree=4 does not divide num_attention_heads=6.*--ulysses_degree 2 --pp_degree 2"):
        Mesh.create(4, 0, 4, 1).check_model(num_attention_heads=6, num_layers=48)
    # only layouts the model takes are advised: 6 ranks of a 2-head, 2-layer model fit none (pp 3 and 6 > 2 layers)
    with pytest.raises(ValueError, match=r"no layout of 6 ranks fits this model: --ulysses_degree must divide 2 "
                                         r"\(1, 2\) and --pp_degree be at most 2") as refused:
        Mesh.create(6, 0, 3, 2).check_model(num_attention_heads=2, num_layers=2)
    assert "--pp_degree 3" not in str(refused.value) and "--pp_degree 6" not in str(refused.value)
    with pytest.raises(ValueError, match=r"num_layers=3 < pp_degree=4.*pp_degree <= 3"):
        Mesh.create(4, 0, 1, 4).check_model(num_attention_heads=48, num_layers=3)
    with pytest.raises(ValueError, match=r"pp_split=30,20 must be strictly increasing.*e\.g\. pp_split=16,32"):
        Mesh.create(3, 0, 1, 3, pp_split="30,20").check_model(48, 48)
    with pytest.raises(ValueError, match=r"between 1 and 47"):
        Mesh.create(2, 0, 1, 2, pp_split="48").check_model(48, 48)
    Mesh.create(8, 0, 4, 2).check_model(48, 48)  # the released model on 8 cards


def test_layer_partitions_balanced_and_explicit():
    assert layer_partition(48, 2) == (range(0, 24), range(24, 48))
    assert [len(r) for r in layer_partition(10, 4)] == [3, 3, 2, 2]
    assert layer_partition(48, 4, "12,24,36") == (range(0, 12), range(12, 24), range(24, 36), range(36, 48))
    assert layer_partition(48, 2, 30) == (range(0, 30), range(30, 48))
    assert layer_partition(5, 1) == (range(0, 5),)
    mesh = Mesh.create(4, 3, 2, 2, pp_split="10")
    assert mesh.stage_layers(48) == range(10, 48)


# ---- schedule ---------------------------------------------------------------------------------
def test_schedule_overlaps_stages_on_micro_batches():
    s = Schedule(stages=2, micro_batches=2)
    assert s.ticks == 3
    assert [[s.micro_at(st, t) for st in range(2)] for t in range(3)] == [[0, None], [1, 0], [None, 1]]
    assert [s.transfers_after(t) for t in range(3)] == [True, True, False]
    one = Schedule(stages=1, micro_batches=1)
    assert one.ticks == 1 and not one.transfers_after(0)
    assert micro_batch_count(2, 1) == 1 and micro_batch_count(2, 2) == 2 and micro_batch_count(1, 4) == 1


# ---- token shards -----------------------------------------------------------------------------
def test_token_shard_pads_the_last_ranks_and_masks_the_padding():
    shards = [TokenShard(27, 2, i) for i in range(2)]
    assert [(s.start, s.stop, s.local) for s in shards] == [(0, 14, 14), (14, 27, 14)]
    tokens = np.random.default_rng(0).standard_normal((2, 27, 5)).astype(np.float32)
    last = shards[1].take(Tensor(tokens)).asnumpy()
    np.testing.assert_array_equal(last[:, :13], tokens[:, 14:])
    np.testing.assert_array_equal(last[:, 13:], 0)
    # side by side (the order of Ulysses' all-to-all), the shards are the tokens then the padding, so
    # attending to the first 27 keys leaves exactly the padding out
    side_by_side = np.concatenate([s.take(Tensor(tokens)).asnumpy() for s in shards], axis=1)
    np.testing.assert_array_equal(side_by_side[:, :27], tokens)
    assert shards[0].has_padding and not TokenShard(16, 2, 1).has_padding
    four = [TokenShard(5, 4, i) for i in range(4)]  # 2 rows per rank: rank 3 holds only padding
    assert [s.real for s in four] == [2, 2, 1, 0]
    side_by_side = np.concatenate([s.take(Tensor(tokens[:, :5])).asnumpy() for s in four], axis=1)
    np.testing.assert_array_equal(side_by_side[:, :5], tokens[:, :5])
    np.testing.assert_array_equal(side_by_side[:, 5:], 0)


def test_token_shard_rope_is_the_ranks_own_positions_then_identity():
    model = StepVideoModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1,
                           caption_channels=[8, 4])
    grid = (3, 3, 3)
    full = model.rope_for(grid)
    rope = TokenShard(27, 2, 1).rope(model, grid)
    np.testing.assert_array_equal(rope.cos.asnumpy()[:13], full.cos.asnumpy()[14:])
    np.testing.assert_array_equal(rope.sin.asnumpy()[:13], full.sin.asnumpy()[14:])
    np.testing.assert_array_equal(rope.cos.asnumpy()[13:], 1)
    np.testing.assert_array_equal(rope.sin.asnumpy()[13:], 0)
    only_padding = TokenShard(5, 4, 3).rope(model, (1, 1, 5))
    assert only_padding.cos.shape == (2, 1, 16)


def test_single_rank_ulysses_core_is_plain_attention():
    rng = np.random.default_rng(1)
    q, k, v = (Tensor(rng.standard_normal((1, 6, 2, 8)).astype(np.float32)) for _ in range(3))
    comm = LocalCommunicator(Mesh.create(1, 0))
    core = UlyssesAttention(comm, (0,), TokenShard(6, 1, 0), batch=1, heads=2, head_dim=8)
    np.testing.assert_allclose(core(q, k, v).asnumpy(), ops.attention(q, k, v).asnumpy(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="ulysses_degree=2"):
        UlyssesAttention(comm, (0, 1), TokenShard(6, 2, 0), batch=1, heads=3, head_dim=8)


# ---- communicator of one rank ------------------------------------------------------------------
def test_local_communicator_and_layout_helpers():
    comm = make_communicator(Mesh.create(1, 0))
    assert isinstance(comm, LocalCommunicator) and not comm.lockstep
    x = Tensor(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert comm.all_to_all(x, (0,), 2, 1) is x and comm.all_gather(x, (0,), 1) is x
    assert comm.broadcast(x, 0) is x
    assert comm.shift(None, None, None, (2, 3, 4), ms.float32) is None
    with pytest.raises(ValueError, match="peer rank 1"):
        comm.shift(None, None, 1, (2, 3, 4), ms.float32)
    with pytest.raises(ValueError, match="this rank"):
        comm.all_gather(x, (1,), 0)
    stacked = split_to_front(x, 2, 2)
    assert stacked.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(merge_from_front(stacked, 2).asnumpy(), x.asnumpy())
    np.testing.assert_array_equal(merge_from_front(stacked, 0).asnumpy(),
                                  np.concatenate([x.asnumpy()[..., :2], x.asnumpy()[..., 2:]], axis=0))


# ---- stage loading and the loop ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_units")
    return {kind: write_model(str(root / kind), kind, seed=5) for kind in ("t2v", "ti2v")}


def test_stage_filter_and_loading_keep_only_the_stage(tiny_dirs):
    mesh = Mesh.create(2, 1, ulysses_degree=1, pp_degree=2, pp_split="3")
    keep = stage_param_filter(mesh, 4)
    assert keep("pos_embed.proj.weight") and keep("proj_out.bias") and keep("transformer_blocks.3.ff.net.0.proj.weight")
    assert not keep("transformer_blocks.2.attn1.wqkv.weight")
    assert not stage_param_filter(Mesh.create(2, 0, 1, 2), 12)("transformer_blocks.10.norm1.weight")
    model = load_stage_model(tiny_dirs["t2v"], mesh, progress=False)
    held = {n for n, p in model.parameters_and_names() if not p.has_init}
    assert "transformer_blocks.3.attn1.wqkv.weight" in held and "caption_projection.linear_1.weight" in held
    assert not any(n.startswith(("transformer_blocks.0.", "transformer_blocks.2.")) for n in held)
    with pytest.raises(ValueError, match="does not divide num_attention_heads=4"):
        load_stage_model(tiny_dirs["t2v"], Mesh.create(3, 0, 3, 1), progress=False)


@pytest.mark.parametrize("kind", ["t2v", "ti2v"])
def test_world_of_one_runs_the_single_process_loop(tiny_dirs, kind):
    case = Case(kind, (1, 3, 3), 1, 1)
    mesh = Mesh.create(1, 0)
    inputs = case_inputs(case)
    model = load_stage_model(tiny_dirs[kind], mesh, progress=False)
    got = parallel_denoise(mesh, make_communicator(mesh), model, Tensor(inputs["latents"]),
                           conditioning(inputs, kind), FlowMatchScheduler(), STEPS, TIME_SHIFT, GUIDANCE,
                           progress=False).asnumpy()
    want = reference_latents(tiny_dirs[kind], case)
    assert np.abs(got - want).max() <= tolerance(want)


def test_guidance_batch_mismatch_is_refused_before_the_loop(tiny_dirs):
    case = Case("t2v", (1, 2, 2), 1, 1)
    mesh = Mesh.create(1, 0)
    inputs = case_inputs(case)
    cond = conditioning({k: v[:1] for k, v in inputs.items()}, "t2v")
    model = load_stage_model(tiny_dirs["t2v"], mesh, progress=False)
    with pytest.raises(ValueError, match=r"guidance_scale=5.0 needs 2: pass \[prompt, negative prompt\]"):
        parallel_denoise(mesh, make_communicator(mesh), model, Tensor(inputs["latents"]), cond,
                         FlowMatchScheduler(), STEPS, TIME_SHIFT, GUIDANCE, progress=False)


# ---- sharded block weights ------------------------------------------------------------------
def test_block_layout_slices_cover_every_element_once():
    from stepvideo_ms.parallel.shard import BlockLayout

    layout = BlockLayout(("a", "b", "c"), ((2, 3), (4,), (5,)))
    starts = np.cumsum([0, 6, 4])
    for parts in range(1, 5):
        size = layout.shard_size(parts)
        covered = []
        for index in range(parts):
            for i, lo, hi in layout.pieces(index * size, min((index + 1) * size, layout.total)):
                covered += list(range(starts[i] + lo, starts[i] + hi))
        assert covered == list(range(layout.total)), parts


def test_safetensors_get_range_reads_flat_element_ranges(tmp_path):
    from stepvideo_ms.formats.safetensors_io import SafetensorsFile, save_file_atomic

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    save_file_atomic({"x": x}, str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(str(tmp_path / "t.safetensors"))
    assert np.array_equal(f.get_range("x", 5, 17), x.reshape(-1)[5:17])
    assert f.get_range("x", 3, 3).shape == (0,)
    with pytest.raises(ValueError, match=r"elements 20\.\.25 lie outside tensor 'x' of 24"):
        f.get_range("x", 20, 25)
