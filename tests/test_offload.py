"""Block offload (--offload), sequential CFG (--sequential_cfg) and the automatic layout (issue 16).

- one process on CPU: the final latents with offload, with sequential CFG and with both equal the plain run
  (T2V and TI2V); the device-resident parameters counted from the loaded model are the non-block ones plus
  the working block; the host blocks are file-backed;
- ascend-sim (a subprocess): the same latents with the emulated side stream, events and pinned memory; two
  working blocks; the copy of the next block in flight while one computes; removing the compute stream's
  wait is an error, and so is removing the side stream's wait on the compute stream's release of a block;
- the stream emulators' rules, called directly;
- the planner's offload arithmetic, its choice of layout, and run_parallel's automatic layout and refusals.
(The msrun layouts with offload are cases of tests/test_parallel_msrun.py and test_ascend_sim_parallel.py.)
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor

from conftest import REPO
from parallel_cases import (GUIDANCE, STEPS, TIME_SHIFT, Case, case_inputs, conditioning, reference_latents,
                            tolerance, write_model)
from stepvideo_ms.parallel import Mesh, load_stage, make_communicator, parallel_denoise
from stepvideo_ms.parallel import plan as planner
from stepvideo_ms.parallel.dit_forward import ParallelDiT

GRID = (3, 3, 3)
GRID_204F = (36, 34, 62)
RELEASED = planner.ModelShape.from_config({})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload_models")
    for kind in ("t2v", "ti2v"):
        write_model(str(root / kind), kind, seed=5)
    return str(root)


def _run(path, kind, weights=None, **mesh_args):
    from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler

    mesh = Mesh.create(1, 0, **mesh_args)
    model, held = load_stage(path, mesh, progress=False, weights=weights)
    inputs = case_inputs(Case(kind, GRID, 1, 1))
    out = parallel_denoise(mesh, make_communicator(mesh), model, Tensor(inputs["latents"]), conditioning(inputs, kind),
                           FlowMatchScheduler(), STEPS, TIME_SHIFT, GUIDANCE, progress=False, shards=held)
    return out.asnumpy(), model, held, mesh


@pytest.mark.parametrize("kind", ["t2v", "ti2v"])
def test_offload_sequential_cfg_and_chunks_equal_the_plain_run(models, kind):
    path = os.path.join(models, kind)
    want = reference_latents(path, Case(kind, GRID, 1, 1))
    assert float(np.abs(want - case_inputs(Case(kind, GRID, 1, 1))["latents"]).max()) > 1e-2
    for mesh_args in (dict(offload=True), dict(sequential_cfg=True), dict(offload=True, sequential_cfg=True),
                      dict(chunk_tokens=4), dict(offload=True, sequential_cfg=True, chunk_tokens=10)):
        got = _run(path, kind, **mesh_args)[0]
        err = float(np.abs(got - want).max())
        assert err <= tolerance(want), f"{mesh_args}: max |got - plain| = {err:.3g}"


def test_device_resident_parameters_are_the_non_block_ones_and_the_working_block(models):
    _, model, host, mesh = _run(os.path.join(models, "t2v"), "t2v", offload=True)
    block = host.layout.total
    every = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names())
    outside = every - model.num_layers * block
    loaded = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names() if not p.has_init)
    assert loaded == outside  # the model's own blocks were never given storage
    streamer = ParallelDiT(mesh, make_communicator(mesh), model, host).blocks
    working = sum(int(np.prod(p.shape)) for cell in streamer.slots for _, p in cell.parameters_and_names())
    assert len(streamer.slots) == 1 and working == block  # CPU: one working block, filled synchronously
    assert host.numel() == model.num_layers * block and host.layers == list(range(model.num_layers))
    # host blocks are file-backed (told apart from working memory): this host's one shared copy of the stage
    from stepvideo_ms.parallel.host_share import mapped_memory

    assert host.shared is not None and host.shared.nbytes == host.backing.nbytes >= host.nbytes()
    assert mapped_memory(os.path.basename(host.map_path))["Rss"] >= host.nbytes()  # resident, file-backed
    # a plain stage holds every block on the device
    plain = load_stage(os.path.join(models, "t2v"), Mesh.create(1, 0), progress=False)[0]
    assert sum(int(np.prod(p.shape)) for _, p in plain.parameters_and_names() if not p.has_init) == every


def test_int8_offload_equals_int8_without_offload(models):
    """--offload --weights int8 on CPU: int8 host blocks copied into an int8 working block give the
    latents of the int8 model without offload; the device holds the non-block parameters and that block."""
    import mindspore as ms

    path = os.path.join(models, "t2v")
    want = reference_latents(path, Case("t2v", GRID, 1, 1, weights="int8"))
    full = reference_latents(path, Case("t2v", GRID, 1, 1))
    assert float(np.abs(want - full).max()) > 1e-6  # the int8 weights do change the result
    got, model, host, mesh = _run(path, "t2v", weights="int8", offload=True)
    err = float(np.abs(got - want).max())
    assert err <= tolerance(want), f"max |int8 offload - int8 plain| = {err:.3g}"
    assert model.weights == "int8" and any(a.dtype == np.int8 for a in host.blocks[0])
    streamer = ParallelDiT(mesh, make_communicator(mesh), model, host).blocks
    slot = dict(streamer.slots[0].parameters_and_names())
    assert [slot[n].dtype == ms.int8 for n in host.layout.names] == [a.dtype == np.int8 for a in host.blocks[0]]
    loaded = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names() if not p.has_init)
    every = sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names())
    assert loaded == every - model.num_layers * host.layout.total  # the model's own blocks hold no storage
    assert streamer.device_elements() == host.layout.total


def test_offload_under_ascend_sim(models):
    env = {**os.environ, "STEPVIDEO_DEVICE": "ascend-sim", "GLOG_v": "3",
           "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    done = subprocess.run([sys.executable, os.path.join(REPO, "tests", "offload_sim_checks.py"), models],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["device"] == "ascend-sim" and report["dtype"] == "BFloat16"
    for kind in ("t2v", "ti2v"):
        r = report[kind]
        assert r["moved"] > 1e-2 and r["finite"]
        assert r["err"] <= 1e-4 * (1 + r["scale"]), r  # same bf16 arithmetic, same weights
        assert r["model_resident"] + r["layers"] * r["block"] == r["model_resident"] + r["host"]
        if not report["pinned_host_memory"]:
            # a MindSpore without Tensor.pin_memory (2.7.0): one working block, filled synchronously, no copy
            # in flight (the simulation does not add the missing API, so this fallback is what ran)
            assert not r["pinned"] and r["working_blocks"] == 1 and r["working"] == r["block"], r
            assert r["copies_one_forward"] == r["layers"] and r["in_flight_after"] == [], r
            continue
        assert r["working_blocks"] == 2 and r["working"] == 2 * r["block"]
        assert r["pinned"]
        # one forward: 4 blocks copied, plus the first block of the next forward already in flight
        assert r["copies_one_forward"] == r["layers"] + 1 and r["in_flight_after"] == [0]
        assert "still being copied" in r["without_wait"] and "wait_event" in r["without_wait"], r["without_wait"]
        assert "has not waited for" in r["without_release_wait"] and "wait_event" in r["without_release_wait"], \
            r["without_release_wait"]
    q = report["int8"]  # --offload --weights int8: int8 host and working blocks, the W8A16 emulator
    assert q["moved"] > 1e-2 and q["err"] <= 1e-4 * (1 + q["scale"]), q
    assert q["host_int8"] > 0 and q["working_int8_match"] and q["w8a16_calls"] > 0, q
    if report["pinned_host_memory"]:
        assert q["host_pinned"] and q["working_blocks"] == 2, q
        assert q["copies_one_forward"] == q["layers"] + 1 and q["in_flight_after"] == [0], q
    else:
        assert not q["host_pinned"] and q["working_blocks"] == 1 and q["in_flight_after"] == [], q


# ---- the stream emulators' rules --------------------------------------------------------------------

def holder_class(param):
    """A Cell whose one parameter is `param` (the emulated Cell call checks its parameters' copies)."""
    from mindspore import nn

    class Holder(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = param

        def construct(self):
            return self.w * 1

    return Holder


def test_emulated_copy_lands_when_its_event_is_waited_on():
    import mindspore as ms
    from mindspore import Parameter, nn
    from stepvideo_ms.testing.ascend_sim import streams

    copy_ = streams._copy_emulator(Tensor.copy_)
    pin = streams._pin_memory_emulator(None)
    dst = Parameter(Tensor(np.zeros(3, np.float32)), name="w")
    src = pin(Tensor(np.arange(3, dtype=np.float32)))
    side = streams.Stream()
    with streams.StreamCtx(side):
        assert streams.current_stream() is side
        copy_(dst, src, non_blocking=True)
        event = streams.Event()
        event.record(side)
    assert streams.current_stream() is streams.default_stream()
    assert np.array_equal(dst.asnumpy(), np.zeros(3)) and streams.inflight_names() == ["w"]  # not landed yet

    Holder = holder_class(dst)
    call = streams._cell_call_emulator(nn.Cell.__call__)
    with pytest.raises(RuntimeError, match="still being copied"):
        call(Holder())
    streams.current_stream().wait_event(event)
    assert np.array_equal(dst.asnumpy(), np.arange(3)) and not streams.inflight_names()
    assert np.array_equal(call(Holder()).asnumpy(), np.arange(3))
    with pytest.raises(RuntimeError, match="not pinned"), streams.StreamCtx(side):
        copy_(dst, Tensor(np.ones(3, np.float32)), non_blocking=True)
    with pytest.raises(TypeError):
        copy_(dst, src, blocking=True)  # not an argument of copy_
    with pytest.raises(TypeError):
        streams.Stream().wait_event(object())
    assert ms.runtime.Stream is not streams.Stream  # nothing installed in this CPU process


def test_emulated_copy_into_a_block_in_use_waits_for_its_release():
    """The other half of the stream contract: a copy on the side stream into a parameter the compute
    stream used is refused until the side stream waited on an event recorded after that use."""
    from mindspore import Parameter, nn
    from stepvideo_ms.testing.ascend_sim import streams

    copy_ = streams._copy_emulator(Tensor.copy_)
    pin = streams._pin_memory_emulator(None)
    call = streams._cell_call_emulator(nn.Cell.__call__)
    dst = Parameter(Tensor(np.zeros(3, np.float32)), name="slot_w")

    Holder = holder_class(dst)
    side, compute = streams.Stream(), streams.default_stream()
    with streams.StreamCtx(side):
        copy_(dst, pin(Tensor(np.arange(3, dtype=np.float32))), non_blocking=True)
        landed = side.record_event()
    compute.wait_event(landed)
    assert np.array_equal(call(Holder()).asnumpy(), np.arange(3))  # the compute stream uses the block
    before_use_ended = compute.record_event()
    call(Holder())  # a second use, after that event
    with streams.StreamCtx(side):
        with pytest.raises(RuntimeError, match="has not waited for.*wait_event"):
            copy_(dst, pin(Tensor(np.ones(3, np.float32))), non_blocking=True)  # no wait at all
        side.wait_event(before_use_ended)
        with pytest.raises(RuntimeError, match="has not waited for"):
            copy_(dst, pin(Tensor(np.ones(3, np.float32))), non_blocking=True)  # an event before the last use
        side.wait_event(compute.record_event())  # released after the last use
        copy_(dst, pin(Tensor(np.ones(3, np.float32))), non_blocking=True)
        side.synchronize()
    assert np.array_equal(dst.asnumpy(), np.ones(3))
    call(Holder())
    other = streams.Stream()
    with streams.StreamCtx(other):
        with pytest.raises(RuntimeError, match="has not waited for"):
            copy_(dst, pin(Tensor(np.full(3, 2, np.float32))), non_blocking=True)
    compute.synchronize()  # the host waited for the compute stream: every use is over
    with streams.StreamCtx(other):
        copy_(dst, pin(Tensor(np.full(3, 2, np.float32))), non_blocking=True)
        other.synchronize()
    assert np.array_equal(dst.asnumpy(), np.full(3, 2))


def test_mesh_refuses_offload_with_shard_weights_and_negative_chunks():
    with pytest.raises(ValueError, match="use one of --offload and --shard_weights"):
        Mesh.create(2, 0, 2, 1, shard_weights=True, offload=True)
    with pytest.raises(ValueError, match="chunk_tokens=-1 must be a positive number"):
        Mesh.create(1, 0, chunk_tokens=-1)


# ---- the planner ------------------------------------------------------------------------------------
def test_offload_plan_by_hand():
    block, other = RELEASED.block_params, RELEASED.other_params
    hw = planner.Hardware()
    plain = planner.plan(RELEASED, planner.Layout(1, 1, 1, False), GRID_204F)
    off = planner.plan(RELEASED, planner.Layout(1, 1, 1, False, offload=True), GRID_204F)
    assert off.memory["weights"] == (2 * block + other) * 2  # two working blocks and everything else
    assert off.host_bytes == 48 * block * 2 and off.host_copy_bytes == 48 * block * 2  # once per step (1 micro-batch)
    copy_s = block * 2 / (hw.host_link_gb_s * 1e9)
    per_block = plain.compute_s / 48
    assert copy_s < per_block  # ~48 ms under seconds of compute: hidden but for the assumed 5 %
    assert off.offload_s == pytest.approx(48 * (1 - hw.offload_overlap) * copy_s)
    assert off.offload_ratio <= 1.05
    seq = planner.plan(RELEASED, planner.Layout(1, 1, 1, False, offload=True, seq_cfg=True), GRID_204F)
    assert seq.memory["block activations"] == off.memory["block activations"] // 2
    assert seq.host_copy_bytes == 2 * off.host_copy_bytes  # every block once per half
    chunked = planner.plan(RELEASED, planner.Layout(1, 1, 1, False, True, True, planner.CHUNK_TOKENS), GRID_204F)
    units = hw.activation_units
    assert chunked.memory["block activations"] == pytest.approx(
        seq.memory["block activations"] * (units - hw.chunk_units_saved) / units, rel=1e-6)
    small = planner.plan(RELEASED, planner.Layout(1, 1, 48, False, offload=True), GRID_204F)  # 1 block per stage
    assert small.host_copy_bytes == 0 and small.offload_s == 0  # kept: no copy per step
    with pytest.raises(ValueError):
        planner.plan(RELEASED, planner.Layout(1, 1, 2, False, seq_cfg=True), GRID_204F)


@pytest.mark.parametrize("cards,card_gb,want", [
    (1, 32, planner.Layout(1, 1, 1, False, True, True, planner.CHUNK_TOKENS)),
    (1, 64, planner.Layout(1, 1, 1, False, offload=True)),
    (2, 32, planner.Layout(1, 2, 1, False, offload=True, seq_cfg=True)),
    (4, 64, planner.Layout(2, 2, 1, True)),
])
def test_planner_chooses_the_fastest_layout_that_fits(cards, card_gb, want):
    plans = [planner.plan(RELEASED, lay, GRID_204F) for lay in planner.layouts(cards, 48, 48)]
    best = planner.choose(plans, card_gb)
    assert best.layout == want, best.layout
    assert best.fits(card_gb) and all(best.step_s <= p.step_s + 1e-3 for p in plans if p.fits(card_gb))
    assert planner.choose(plans, 1) is None


def test_describe_plan_lists_offload_layouts(capsys):
    from stepvideo_ms.tools import describe

    assert describe.main(["--plan", "--cards", "1", "--card_gb", "64"]) == 0
    out = capsys.readouterr().out
    assert "ulysses 1 x pp 1 + offload" in out and "host GiB" in out and "offload x" in out
    assert "chosen (fastest predicted to fit): --ulysses_degree 1 --pp_degree 1 --offload" in out
    # a host of 160 GiB: its offloaded blocks may take 80 % of it, 128 GiB
    assert describe.main(["--plan", "--cards", "4", "--card_gb", "32", "--host_gb", "160"]) == 0
    out = capsys.readouterr().out
    assert "cfg 2 x ulysses 2 x pp 1 + offload " not in out  # 4 ranks x a whole model = 216 GiB of host memory
    assert "ulysses 2 x pp 2 + offload" in out  # 2 ranks per stage x half the model = 108 GiB


# ---- run_parallel's automatic layout ------------------------------------------------------------------
def _validate(model_dir, tmp_path, monkeypatch, world, extra):
    from stepvideo_ms.generation import checks, cli

    monkeypatch.setenv("MS_WORKER_NUM", str(world))
    args = cli.build_parser().parse_args(["--model_dir", model_dir, "--caption_url", "local", "--vae_url", "local",
                                          "--prompt", "x", "--save_path", str(tmp_path), "--device", "CPU", *extra])
    checks.validate(args, world)
    return args


def test_run_parallel_picks_the_layout_when_none_is_given(tmp_path, monkeypatch, capsys):
    model = str(tmp_path / "tiny")
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", model], check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "GLOG_v": "3"}, timeout=300)
    small = ["--num_frames", "17", "--height", "64", "--width", "96"]
    args = _validate(model, tmp_path, monkeypatch, 2, small + ["--card_gb", "8"])
    out = capsys.readouterr().out
    assert "[run_parallel] layout for 2 card(s) of 8 GiB (CPU backend, 17 frames 64x96, rank 0 also holding the " \
           "local encoders/VAE (" in out, out  # --caption_url local --vae_url local: their weights share card 0
    assert "predicted peak" in out and ", 50 steps " in out  # the run's time beside the step's
    chosen = (args.cfg_degree, args.ulysses_degree, args.pp_degree)
    assert chosen[0] * chosen[1] * chosen[2] == 2
    # a card too small for any layout: refused, naming the smallest and what to change
    with pytest.raises(ValueError, match=r"no layout of 2 card\(s\) of 1e-06 GiB is predicted to fit .*caption/VAE "
                                         r"servers on other cards, fewer --num_frames"):
        _validate(model, tmp_path, monkeypatch, 2, small + ["--card_gb", "0.000001"])
    # explicit flags win (no choice printed) and are still checked against the card
    args = _validate(model, tmp_path, monkeypatch, 2, small + ["--pp_degree", "2", "--card_gb", "8", "--offload"])
    assert (args.cfg_degree, args.ulysses_degree, args.pp_degree, args.offload) == (1, 1, 2, True)
    assert "layout for" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="ulysses 2 x pp 1 \\+ offload is predicted to need .* beside .* GiB of local"):
        _validate(model, tmp_path, monkeypatch, 2, small + ["--ulysses_degree", "2", "--offload", "--card_gb", "1e-6"])


def test_one_card_holds_the_local_encoders_and_vae_in_turn(tmp_path, monkeypatch, capsys):
    """A card too small for the DiT beside the resident encoders/VAE but big enough for each in turn:
    the automatic choice loads them in turn; the in-turn backends load per call and give the same answers."""
    import argparse
    from stepvideo_ms.diffusion.backends import InProcessBackends
    from stepvideo_ms.formats.checkpoint import read_config
    from stepvideo_ms.generation import checks

    model = str(tmp_path / "tiny")
    subprocess.run([sys.executable, "-m", "stepvideo_ms", "tiny", model], check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "GLOG_v": "3"}, timeout=300)
    parts = checks.local_backend_parts(argparse.Namespace(model_dir=model, caption_url="local", vae_url="local"), 4)
    assert set(parts) == {"encoders", "vae"} and all(v > 0 for v in parts.values())
    shape = planner.ModelShape.from_config(read_config(os.path.join(model, "transformer")))
    plain = planner.plan(shape, planner.Layout(1, 1, 1, False), (3, 4, 6), hardware=planner.CPU)
    in_turn = max(plain.peak_bytes, plain.memory["weights"] + max(parts.values())) * 1.01 / planner.GIB
    assert in_turn < (plain.peak_bytes + sum(parts.values())) / planner.GIB * 0.99
    # --vae_tile: the planner would count the tiny VAE's predicted decode (0.05 GiB even in 1-position tiles,
    # more than this card) and refuse; a tile the user gives is the user's choice
    args = _validate(model, tmp_path, monkeypatch, 1, ["--num_frames", "17", "--height", "64", "--width", "96",
                                                        "--card_gb", f"{in_turn:.6f}", "--vae_tile", "1"])
    assert args.local_in_turn and "the local encoders and VAE loaded in turn" in capsys.readouterr().out
    resident = InProcessBackends.from_model_dir(model, progress=False, vae=False)
    turn = InProcessBackends.from_model_dir(model, progress=False, vae=False, in_turn=True)
    assert turn.caption_encoder is None and turn.loads == 0
    for _ in range(2):
        got, want = turn.caption(["a cat"]), resident.caption(["a cat"])
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert turn.loads == 2 and turn.caption_encoder is None  # loaded for each call, released after
