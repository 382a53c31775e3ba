import os

import pytest

os.environ.setdefault("GLOG_v", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.environ.get("STEPVIDEO_GOLDEN", os.path.join(REPO, "..", "shared", "golden"))


@pytest.fixture(scope="session", autouse=True)
def _cpu_runtime():
    from stepvideo_ms import runtime

    runtime.init("CPU")


@pytest.fixture(scope="session")
def golden_dir():
    if not os.path.isdir(GOLDEN):
        pytest.fail(f"golden data not found at {GOLDEN}: the tests need ../shared/golden beside the repo")
    return GOLDEN
