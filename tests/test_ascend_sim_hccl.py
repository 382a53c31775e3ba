"""The native communicator on the simulated HCCL (device ascend-sim) under real msrun workers.

One msrun launch per world size (2 and 4) runs tests/parallel_worker.py with STEPVIDEO_DEVICE=
ascend-sim: `init_world` and `make_communicator` take their Ascend branches (HCCL world, sub-groups
made with create_group by their members only, AlltoAll / AllGather / Broadcast, mint.distributed
send/recv), checked against numpy on every layout of the world size; then the simulation's own
checks (tests/ascend_sim_checks.py): real signatures, argument rules (split_count = group size,
contiguous inputs, global ranks), and dead-locks reported within their timeout.
"""
import json
import os

import pytest

from parallel_cases import save_cases
from stepvideo_ms.parallel.msrun import run_msrun

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")
LAUNCH_TIMEOUT = 420


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """world size -> (output dir, msrun result), each world launched once on first use."""
    done = {}

    def launch(world: int):
        if world not in done:
            out = tmp_path_factory.mktemp(f"ascend_sim_world{world}")
            cases_json = str(out / "cases.json")
            save_cases([], cases_json)
            env = {"STEPVIDEO_DEVICE": "ascend-sim", "STEPVIDEO_SIM_HCCL_DIR": str(out / "hccl"),
                   "STEPVIDEO_SIM_HCCL_TIMEOUT": "120"}
            result = run_msrun(WORKER, [cases_json, str(out), str(out)], workers=world, log_dir=str(out / "logs"),
                               timeout=LAUNCH_TIMEOUT, extra_env=env)
            done[world] = (str(out), result)
        out, result = done[world]
        if not result.ok:
            pytest.fail(f"msrun with {world} workers under ascend-sim failed\n{result.logs()}")
        return out, result

    return launch


def _reports(out: str, world: int):
    reports = []
    for rank in range(world):
        with open(os.path.join(out, f"report.rank{rank}.json"), "r", encoding="utf-8") as fh:
            reports.append(json.load(fh))
    return reports


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("world", [2, 4])
def test_native_communicator_matches_numpy(launches, world):
    out, result = launches(world)
    failures = [f"rank {r}: {m}" for r, rep in enumerate(_reports(out, world)) for m in rep["comm"]]
    assert not failures, "\n".join(failures) + "\n" + result.logs()
    assert "device ascend-sim" in result.logs()


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("world", [2, 4])
def test_simulated_hccl_rules_and_deadlocks(launches, world):
    out, result = launches(world)
    reports = _reports(out, world)
    assert all("sim" in rep for rep in reports), "the simulation's checks did not run"
    failures = [f"rank {r}: {m}" for r, rep in enumerate(reports) for m in rep["sim"]]
    assert not failures, "\n".join(failures)
