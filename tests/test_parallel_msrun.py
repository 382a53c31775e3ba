"""CFG x pipeline x Ulysses parallel denoising (with or without sharded block weights) under real
`msrun` workers on CPU equals one process.

One msrun launch per world size (2 and 4 ranks) runs every case of that size; each case's final
latents (2 denoising steps, CFG batch as two micro-batches) must match the single-process loop
within 1e-4 x (1 + max|x|) on every rank, and be identical across ranks. Grids of 27 and 5 tokens
make the sequence split uneven (padding, and at 4-way a rank with no real token).
"""
import os

import numpy as np
import pytest

from parallel_cases import (KINDS, Case, cached_reference, case_inputs, output_path, read_reports, reference_latents,
                            save_cases, tolerance, write_model)
from stepvideo_ms.parallel.msrun import run_msrun

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")
LAUNCH_TIMEOUT = 420
ODD = (3, 3, 3)  # 27 tokens
EVEN = (2, 2, 4)  # 16 tokens
CASES = (
    # world 2: sequence-parallel only; pipeline only (one with an explicit, unbalanced split)
    [Case(kind, ODD, 2, 1) for kind in KINDS]
    + [Case("t2v", ODD, 1, 2, pp_split="3"), Case("ti2v", ODD, 1, 2)]
    # world 4: both at once (an even grid: no padding; an odd one with a 1/3 split); 4-way SP over
    # 5 tokens leaves one rank with padding only; 4 stages have middle stages that receive and send
    + [Case("t2v", EVEN, 2, 2), Case("ti2v", ODD, 2, 2, pp_split="1"), Case("t2v", (1, 1, 5), 4, 1),
       Case("ti2v", ODD, 1, 4)]
    # sharded block weights and CFG parallel (issue 11), T2V and TI2V each: world 2 = (ulysses 2, shard),
    # (cfg 2); world 4 = (ulysses 2 x pp 2, shard) on the odd grid, (cfg 2 x ulysses 2)
    + [Case(kind, ODD, 2, 1, shard=True) for kind in KINDS] + [Case(kind, ODD, 1, 1, cfg=2) for kind in KINDS]
    + [Case(kind, ODD, 2, 2, shard=True) for kind in KINDS] + [Case(kind, ODD, 2, 1, cfg=2) for kind in KINDS]
    # int8 weights (issue 17), equal to the single-process int8 run: world 2 = ulysses 2 with sharded
    # (int8 + float groups) weights, pp 2; world 4 = ulysses 2 x pp 2 sharded, cfg 2 x ulysses 2
    + [Case("t2v", ODD, 2, 1, shard=True, weights="int8"), Case("ti2v", ODD, 1, 2, weights="int8"),
       Case("ti2v", ODD, 2, 2, shard=True, weights="int8"), Case("t2v", ODD, 2, 1, cfg=2, weights="int8")]
    # block offload (issue 16) in the same launches: ulysses 2 (T2V), cfg 2 (TI2V); pp 2 (TI2V, 2 layers per
    # stage, streamed per micro-batch); ulysses 2 x pp 2 (T2V) and cfg 2 x pp 2 (TI2V)
    + [Case("t2v", ODD, 2, 1, offload=True), Case("ti2v", ODD, 1, 1, cfg=2, offload=True),
       Case("ti2v", ODD, 1, 2, offload=True), Case("t2v", ODD, 2, 2, offload=True),
       Case("ti2v", ODD, 1, 2, cfg=2, offload=True)]
    # four ranks of one stage share one host copy of it (issue 26): cfg 2 x ulysses 2 (T2V)
    + [Case("t2v", ODD, 2, 1, cfg=2, offload=True)]
    # int8 blocks offloaded (issue 26), equal to the single-process int8 run: ulysses 2 (T2V), pp 2 (TI2V),
    # cfg 2 (T2V), all in the world-2 launch
    + [Case("t2v", ODD, 2, 1, weights="int8", offload=True), Case("ti2v", ODD, 1, 2, weights="int8", offload=True),
       Case("t2v", ODD, 1, 1, cfg=2, weights="int8", offload=True)]
    # sequential CFG with sharded weights (a planner choice for 32 GB cards): one gather per block and half
    + [Case("t2v", ODD, 2, 1, shard=True, seq=True)]
)
# the step cache (issue 27). Threshold 0 on the loop: the twin of an uncached case of the same launch, bit for
# bit (ulysses 2, pp 2, cfg 2, offload, sharded; T2V and TI2V). At 0.3 some of 6 steps are cached: every rank
# takes the single-process cached run's steps and latents, on world 2 (ulysses 2, pp 2, cfg 2, ulysses 2
# offloaded / sharded / sharded int8) and world 4 (ulysses 2 x pp 2, cfg 2 x ulysses 2, cfg 2 x pp 2 sharded)
CACHE_TWINS = {Case("t2v", ODD, 2, 1, cache=0.0): Case("t2v", ODD, 2, 1),
               Case("ti2v", ODD, 1, 2, cache=0.0): Case("ti2v", ODD, 1, 2),
               Case("t2v", ODD, 1, 1, cfg=2, cache=0.0): Case("t2v", ODD, 1, 1, cfg=2),
               Case("t2v", ODD, 2, 1, offload=True, cache=0.0): Case("t2v", ODD, 2, 1, offload=True),
               Case("ti2v", ODD, 2, 1, shard=True, cache=0.0): Case("ti2v", ODD, 2, 1, shard=True)}
CACHED = [Case("t2v", ODD, 2, 1, cache=0.3), Case("ti2v", ODD, 1, 2, cache=0.3), Case("t2v", ODD, 1, 1, cfg=2, cache=0.3),
          Case("t2v", ODD, 2, 1, offload=True, cache=0.3), Case("ti2v", ODD, 2, 1, shard=True, cache=0.3),
          Case("t2v", EVEN, 2, 2, cache=0.3), Case("ti2v", ODD, 2, 1, cfg=2, cache=0.3),
          Case("t2v", ODD, 1, 2, cfg=2, shard=True, cache=0.3),
          Case("t2v", ODD, 2, 1, shard=True, weights="int8", cache=0.3)]
CASES = CASES + list(CACHE_TWINS) + CACHED


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_models")
    for kind in KINDS:
        write_model(str(root / kind), kind, seed=3)
    return str(root)


@pytest.fixture(scope="module")
def references(models_dir):
    """(kind, grid) -> single-process final latents, computed once (the inputs depend on nothing else)."""
    done = {}

    def reference(case: Case) -> np.ndarray:
        key = (case.kind, case.grid, case.weights, bool(case.cache))
        if key not in done:
            model_dir = os.path.join(models_dir, case.kind)
            done[key] = cached_reference(model_dir, case) if case.cache else (reference_latents(model_dir, case), None)
        return done[key]

    return reference


@pytest.fixture(scope="module")
def launches(models_dir, tmp_path_factory):
    """world size -> (output dir, msrun result), each world launched once on first use."""
    done = {}

    def launch(world: int):
        if world not in done:
            out = tmp_path_factory.mktemp(f"parallel_world{world}")
            cases_json = str(out / "cases.json")
            save_cases([c for c in CASES if c.world == world], cases_json)
            maps = out / "host_maps"  # where the offload cases' shared host maps go (empty afterwards)
            maps.mkdir()
            result = run_msrun(WORKER, [cases_json, models_dir, str(out)], workers=world,
                               log_dir=str(out / "logs"), timeout=LAUNCH_TIMEOUT,
                               extra_env={"STEPVIDEO_OFFLOAD_DIR": str(maps)})
            done[world] = (str(out), result)
        out, result = done[world]
        if not result.ok:
            pytest.fail(f"msrun with {world} workers failed\n{result.logs()}")
        return out, result

    return launch



@pytest.mark.timeout(LAUNCH_TIMEOUT + 120)
@pytest.mark.parametrize("world", [2, 4])
def test_communicator_operations_match_numpy(launches, world):
    out, result = launches(world)
    failures = [f"rank {r}: {msg}" for r, rep in enumerate(read_reports(out, world)) for msg in rep["comm"]]
    assert not failures, "\n".join(failures) + "\n" + result.logs()


@pytest.mark.timeout(LAUNCH_TIMEOUT + 120)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parallel_latents_equal_single_process(launches, references, case):
    out, result = launches(case.world)
    loading = [f"rank {r}: {m}" for r, rep in enumerate(read_reports(out, case.world)) for m in rep["loading"][case.name]]
    assert not loading, "a rank holds more or less than its share of the weights:\n" + "\n".join(loading)
    ranks = [np.load(output_path(out, case, r)) for r in range(case.world)]
    for r, got in enumerate(ranks[1:], start=1):
        assert np.array_equal(got, ranks[0]), f"rank {r} took a different scheduler step than rank 0"
    want, _ = references(case)
    assert ranks[0].shape == want.shape
    err = float(np.abs(ranks[0] - want).max())
    assert err <= tolerance(want), f"{case.name}: max |parallel - single| = {err:.3g} > {tolerance(want):.3g}"
    assert float(np.abs(want - case_inputs(case)["latents"]).max()) > 1e-2  # the loop did move the latents


@pytest.mark.timeout(LAUNCH_TIMEOUT + 120)
@pytest.mark.parametrize("case", list(CACHE_TWINS), ids=lambda c: c.name)
def test_cache_threshold_zero_is_the_uncached_layout_exactly(launches, case):
    out, _ = launches(case.world)
    for r in range(case.world):
        assert np.array_equal(np.load(output_path(out, case, r)), np.load(output_path(out, CACHE_TWINS[case], r)))
    records = [rep["cache"][case.name]["record"] for rep in read_reports(out, case.world)]
    assert all(rec["cached_steps"] == [] and rec["blocks_skipped"] == 0 for rec in records)


@pytest.mark.timeout(LAUNCH_TIMEOUT + 120)
@pytest.mark.parametrize("case", CACHED, ids=lambda c: c.name)
def test_cached_layout_takes_the_single_process_decisions(launches, references, case):
    """Every rank caches the steps of the one-process cached run (the latents: the test above); with one
    stage, a rank's offload copies / sharded gathers are exactly the blocks run."""
    out, _ = launches(case.world)
    _, want = references(case)
    assert want["cached_steps"] and len(want["cached_steps"]) < want["steps"] - 1
    for r, rep in enumerate(read_reports(out, case.world)):
        got = rep["cache"][case.name]
        assert got["record"]["cached_steps"] == want["cached_steps"], f"rank {r}"
        assert got["record"]["blocks_run"] == want["blocks_run"], f"rank {r}"
        assert np.allclose([c or 0 for c in got["record"]["relative_l1"]], [c or 0 for c in want["relative_l1"]],
                           rtol=1e-4, atol=1e-6), f"rank {r}"
        if (case.offload or case.shard) and case.pp == 1:
            assert got["fetched"] == want["blocks_run"] < want["steps"] * 4, f"rank {r}"


OFFLOADED = [c for c in CASES if c.offload]


@pytest.mark.timeout(LAUNCH_TIMEOUT + 120)
@pytest.mark.parametrize("case", OFFLOADED, ids=lambda c: c.name)
def test_ranks_of_one_stage_share_one_host_copy(launches, case):
    """The ranks of one stage (all on this host) map one copy of its blocks, written by one of them: the
    proportional resident memory of the map over those ranks adds up to one copy; no map file is left."""
    out, _ = launches(case.world)
    maps = [rep["host_map"][case.name] for rep in read_reports(out, case.world)]
    for stage in range(case.pp):
        mine = [m for m in maps if m["stage"] == stage]
        assert len(mine) == case.world // case.pp
        assert sum(m["created"] for m in mine) == 1, f"stage {stage}: {mine}"
        size = mine[0]["nbytes"]
        assert all(m["nbytes"] == size and m["Rss"] >= 0.95 * size for m in mine)  # each reads all of it
        together = sum(m["Pss"] for m in mine) / size
        assert 0.9 <= together <= 1.1, f"stage {stage}: its {len(mine)} ranks hold {together:.2f} copies"
    assert os.listdir(os.path.join(out, "host_maps")) == []
