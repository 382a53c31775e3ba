"""The Ascend path of the parallel DiT (device ascend-sim: bf16 policy, NPU-op emulators, the native
communicator on the simulated HCCL) under real msrun workers.

One msrun launch per world size (2 and 4) runs tests/parallel_worker.py with STEPVIDEO_DEVICE=
ascend-sim: `init_world` and `make_communicator` take their Ascend branches (HCCL world, sub-groups
made with create_group by their members only, AlltoAll / AllGather / Broadcast, mint.distributed
send/recv), checked against numpy on every layout of the world size; then the layouts (2,1), (1,2),
(2,2), (4,1), (1,4) denoise T2V and TI2V on 27 tokens (2 does not divide them), as do sharded
weights on ulysses 2 x pp 2 and cfg 2 x ulysses 2 (and with int8 weights on ulysses 2 x pp 2), and must
land as close to the float32 run as the single-process simulated (bf16) run does (bf16 arithmetic in
another order rounds differently: the layouts are compared through float32, not bit for bit); last, the simulation's own checks (tests/ascend_sim_hccl_checks.py):
real signatures, argument rules (split_count = group size, contiguous inputs, global ranks), and
dead-locks reported within their timeout.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from parallel_cases import (BF16_MAX_RATIO, BF16_MEAN_RATIO, KINDS, Case, bf16_floor_ratios, case_inputs, output_path,
                            read_reports, reference_path, save_cases, write_model)
from stepvideo_ms.parallel.msrun import run_msrun

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")
LAUNCH_TIMEOUT = 420
SIM_ENV = {"STEPVIDEO_DEVICE": "ascend-sim", "GLOG_v": "3"}
ODD = (3, 3, 3)  # 27 tokens
CASES = ([Case(kind, ODD, u, pp) for u, pp in [(2, 1), (1, 2), (2, 2), (4, 1), (1, 4)] for kind in KINDS]
         # sharded weights (the native communicator gathers the next block ahead) with a pipeline, and
         # CFG replicas that also shard their weights: both in the world-4 launch
         + [Case("ti2v", ODD, 2, 2, shard=True), Case("t2v", ODD, 2, 1, cfg=2, shard=True)]
         # int8 weights (WeightQuantBatchMatmul's emulator) sharded into int8 + bf16 groups over HCCL
         + [Case("t2v", ODD, 2, 2, shard=True, weights="int8")]
         # block offload with the emulated side stream, events and pinned host memory (issue 16): 4 layers
         # streamed through 2 working blocks (cfg 2 x ulysses 2), and a pipeline whose 2-layer stages stay resident
         + [Case("t2v", ODD, 2, 1, cfg=2, offload=True), Case("ti2v", ODD, 2, 2, offload=True)]
         # int8 blocks offloaded (issue 26): int8 working blocks through the W8A16 emulator, world 2: ulysses 2
         # (T2V), pp 2 with a 3-layer first stage (streamed through 2 working blocks, TI2V), cfg 2 (T2V)
         + [Case("t2v", ODD, 2, 1, weights="int8", offload=True),
            Case("ti2v", ODD, 1, 2, pp_split="3", weights="int8", offload=True),
            Case("t2v", ODD, 1, 1, cfg=2, weights="int8", offload=True)])
# the step cache (issue 27): threshold 0 is the uncached ulysses 2 run bit for bit; at 0.3 the copies issued
# ahead on the side stream (offload, 2 working blocks) and the gathers issued ahead over HCCL (sharded, with a
# pipeline) follow the step's blocks that run, and every rank takes the one-process cached run's steps (the
# latents, like every case here, as close to the float32 run as the one-process bf16 run is)
CACHE_TWINS = {Case("t2v", ODD, 2, 1, cache=0.0): Case("t2v", ODD, 2, 1)}
CACHED = [Case("t2v", ODD, 2, 1, cfg=2, offload=True, cache=0.3), Case("ti2v", ODD, 2, 2, shard=True, cache=0.3)]
CASES = CASES + list(CACHE_TWINS) + CACHED


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Models, cases and the single-process latents: simulated (bf16) in the run dir, float32 (CPU) in fp32/."""
    root = tmp_path_factory.mktemp("ascend_sim_parallel")
    for kind in KINDS:
        write_model(str(root / "models" / kind), kind, seed=3)
    cases_json = str(root / "cases.json")
    save_cases(CASES, cases_json)
    for out, device, says in ((root, "ascend-sim", "device ascend-sim, compute dtype BFloat16"),
                              (root / "fp32", "CPU", "device CPU, compute dtype Float32")):
        os.makedirs(out, exist_ok=True)
        done = subprocess.run([sys.executable, WORKER, cases_json, str(root / "models"), str(out), "--reference"],
                              cwd=REPO, env={**os.environ, **SIM_ENV, "STEPVIDEO_DEVICE": device, "PYTHONPATH": REPO},
                              capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert says in done.stdout, done.stdout
    return str(root)


@pytest.fixture(scope="module")
def launches(run_dir):
    """world size -> (output dir, msrun result), each world launched once on first use."""
    done = {}

    def launch(world: int):
        if world not in done:
            out = os.path.join(run_dir, f"world{world}")
            env = {**SIM_ENV, "STEPVIDEO_SIM_HCCL_DIR": os.path.join(out, "hccl"), "STEPVIDEO_SIM_HCCL_TIMEOUT": "120"}
            result = run_msrun(WORKER, [os.path.join(run_dir, "cases.json"), os.path.join(run_dir, "models"), out],
                               workers=world, log_dir=os.path.join(out, "logs"), timeout=LAUNCH_TIMEOUT, extra_env=env)
            done[world] = (str(out), result)
        out, result = done[world]
        if not result.ok:
            pytest.fail(f"msrun with {world} workers under ascend-sim failed\n{result.logs()}")
        return out, result

    return launch



@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("world", [2, 4])
def test_native_communicator_matches_numpy(launches, world):
    out, result = launches(world)
    failures = [f"rank {r}: {m}" for r, rep in enumerate(read_reports(out, world)) for m in rep["comm"]]
    assert not failures, "\n".join(failures) + "\n" + result.logs()
    assert "device ascend-sim" in result.logs()


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_simulated_parallel_latents_equal_single_process(run_dir, launches, case):
    out, result = launches(case.world)
    loading = [f"rank {r}: {m}" for r, rep in enumerate(read_reports(out, case.world)) for m in rep["loading"][case.name]]
    assert not loading, "\n".join(loading)
    ranks = [np.load(output_path(out, case, r)) for r in range(case.world)]
    for r, got in enumerate(ranks[1:], start=1):
        assert np.array_equal(got, ranks[0]), f"rank {r} took a different scheduler step than rank 0"
    want = np.load(reference_path(run_dir, case))
    exact = np.load(reference_path(os.path.join(run_dir, "fp32"), case))
    assert ranks[0].shape == want.shape == exact.shape
    ratio_max, ratio_mean = bf16_floor_ratios(ranks[0], want, exact)
    print(f"{case.name}: |parallel - float32| / |single - float32| = x{ratio_max:.2f} max, x{ratio_mean:.2f} mean")
    assert ratio_max <= BF16_MAX_RATIO and ratio_mean <= BF16_MEAN_RATIO, (
        f"{case.name}: distance to float32 x{ratio_max:.2f} (max), x{ratio_mean:.2f} (mean) of the single-process "
        f"bf16 run's (bounds x{BF16_MAX_RATIO}, x{BF16_MEAN_RATIO})")
    assert float(np.abs(want - case_inputs(case)["latents"]).max()) > 1e-2  # the loop did move the latents


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("case", list(CACHE_TWINS), ids=lambda c: c.name)
def test_simulated_cache_threshold_zero_is_the_uncached_layout_exactly(launches, case):
    out, _ = launches(case.world)
    for r in range(case.world):
        assert np.array_equal(np.load(output_path(out, case, r)), np.load(output_path(out, CACHE_TWINS[case], r)))


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("case", CACHED, ids=lambda c: c.name)
def test_simulated_cached_layout_takes_the_single_process_decisions(run_dir, launches, case):
    out, _ = launches(case.world)
    with open(os.path.join(run_dir, f"{case.name}.reference_cache.json"), encoding="utf-8") as fh:
        want = json.load(fh)
    assert want["cached_steps"] and len(want["cached_steps"]) < want["steps"] - 1
    for r, rep in enumerate(read_reports(out, case.world)):
        got = rep["cache"][case.name]["record"]
        assert got["cached_steps"] == want["cached_steps"] and got["blocks_run"] == want["blocks_run"], f"rank {r}"


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("world", [2, 4])
def test_simulated_hccl_rules_and_deadlocks(launches, world):
    out, result = launches(world)
    reports = read_reports(out, world)
    assert all("sim" in rep for rep in reports), "the simulation's checks did not run"
    failures = [f"rank {r}: {m}" for r, rep in enumerate(reports) for m in rep["sim"]]
    assert not failures, "\n".join(failures)


# ---- run_parallel.py itself: the servers and the workers all under ascend-sim --------------------
@pytest.fixture(scope="module")
def sim_served(tmp_path_factory):
    """(tiny TI2V model dir, url of its caption+VAE server running under ascend-sim)."""
    from serving_support import ServerProcess
    from test_run_parallel import _make_model

    model = _make_model(tmp_path_factory, "ti2v")
    srv = ServerProcess(model, str(tmp_path_factory.mktemp("sim_logs")), "ti2v", "--port", 0, env=SIM_ENV).start()
    yield model, srv.url
    srv.stop()


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
def test_run_parallel_under_simulation_equals_single_process(sim_served, tmp_path):
    """TI2V on 45 tokens, ulysses 2 x pp 2 (AlltoAll on sub-groups, send/recv between stages)."""
    from stepvideo_ms.formats.safetensors_io import load_file
    from test_run_parallel import _args

    model, url = sim_served
    single = tmp_path / "single"
    done = subprocess.run([sys.executable, "run_parallel.py", *_args("ti2v", model, url, single, ["--no_video"])],
                          cwd=REPO, env={**os.environ, **SIM_ENV}, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "device ascend-sim, compute dtype BFloat16" in done.stdout, done.stdout
    reference = load_file(str(single / "latents.safetensors"))["latents"]
    exact_dir = tmp_path / "fp32"  # the same run in float32 on CPU (the same server, so the same embeddings)
    done = subprocess.run([sys.executable, "run_parallel.py", *_args("ti2v", model, url, exact_dir, ["--no_video"])],
                          cwd=REPO, env={**os.environ, **SIM_ENV, "STEPVIDEO_DEVICE": "CPU"}, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exact = load_file(str(exact_dir / "latents.safetensors"))["latents"]
    out = tmp_path / "u2p2"
    result = run_msrun("run_parallel.py", _args("ti2v", model, url, out, ["--ulysses_degree", "2", "--pp_degree", "2",
                       "--no_video"]), 4, str(out / "logs"), LAUNCH_TIMEOUT, extra_env=SIM_ENV)
    assert result.ok, result.logs()
    assert "world 4 = ulysses 2 x pp 2; device ascend-sim, compute dtype BFloat16" in result.logs()
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    assert latents.shape == reference.shape == (1, 3, 8, 3, 5)
    assert np.isfinite(reference).all() and reference.std() > 0
    ratio_max, ratio_mean = bf16_floor_ratios(latents, reference, exact)
    assert ratio_max <= BF16_MAX_RATIO and ratio_mean <= BF16_MEAN_RATIO, (ratio_max, ratio_mean)


ACCOUNTING_SCRIPT = r"""
import json
import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops
from stepvideo_ms import runtime
runtime.init("ascend-sim")
from stepvideo_ms.models.dit import text_key_mask
from stepvideo_ms.testing.ascend_sim import accounting

context = Tensor(np.ones((2, 4, 8), np.float32)).astype(ms.bfloat16)
mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
accounting.reset()
text_key_mask(context, Tensor(mask))   # the product reads a device mask: 1 sync, at its own line
text_key_mask(context, mask)           # a host mask: none
q = Tensor(np.ones((1, 4, 2, 16), np.float32)).astype(ms.bfloat16)
drop = Tensor(np.zeros((1, 1, 4, 4), np.bool_))
ops.flash_attention_score(q, q, q, head_num=2, attn_mask=drop, input_layout="BSND")  # the emulator reads its mask: not counted
float(mint.ones((1,), dtype=ms.float32).sum())  # one sync (float -> asnumpy inside counts once)
ms.runtime.synchronize()  # one sync, and no "CPU device is not supported" error
print(json.dumps(accounting.snapshot()))
"""


def test_accounting_counts_the_products_host_syncs_only():
    env = {**os.environ, **SIM_ENV, "GLOG_v": "2"}  # MindSpore's errors reach stderr
    done = subprocess.run([sys.executable, "-c", ACCOUNTING_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts.get("sync.asnumpy", 0) == 1 and counts.get("sync.float", 0) == 1, counts
    assert counts.get("sync.synchronize", 0) == 1 and "not supported" not in done.stderr, (counts, done.stderr)
    sites = [k for k in counts if k.startswith("site.")]
    assert len(sites) == 3 and any(k.startswith("site.stepvideo_ms/models/dit.py:") for k in sites), counts


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_the_simulated_card_s_own_memory_refuses_settings_that_do_not_fit(sim_served, tmp_path):
    """Without --card_gb, run_parallel.py checks the settings against the memory the card reports
    (mindspore.hal, after the world is joined: MindSpore reports 0 before the device is initialized),
    in one process and on every msrun worker, before any weight is read."""
    from test_run_parallel import _args

    model, url = sim_served
    tiny_card = {**os.environ, **SIM_ENV, "STEPVIDEO_SIM_CARD_GB": "0.001"}
    one = _args("ti2v", model, url, tmp_path / "one", ["--ulysses_degree", "1", "--no_video"])  # a layout: no planner
    done = subprocess.run([sys.executable, "run_parallel.py", *one], cwd=REPO, env=tiny_card, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the card reports 0.001 GiB (pass --card_gb" in done.stderr, done.stderr[-3000:]
    assert "loading" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert "note: " not in done.stdout  # the card did report its memory
    out = tmp_path / "u2"
    result = run_msrun("run_parallel.py", _args("ti2v", model, url, out, ["--ulysses_degree", "2", "--no_video"]), 2,
                       str(out / "logs"), LAUNCH_TIMEOUT, extra_env={**SIM_ENV, "STEPVIDEO_SIM_CARD_GB": "0.001"})
    assert not result.ok and not (out / "latents.safetensors").exists()
    logs = []
    for rank in (0, 1):
        with open(out / "logs" / f"worker_{rank}.log", encoding="utf-8", errors="replace") as fh:
            logs.append(fh.read())
    # every rank checks after the world is joined; the first refusal ends the job (msrun stops the other
    # workers), so the other rank may be stopped before it prints its own refusal
    assert any("the card reports 0.001 GiB" in log for log in logs), result.logs()
