import os

import pytest

os.environ.setdefault("GLOG_v", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The golden data travels with the repository (tests/golden); STEPVIDEO_GOLDEN points elsewhere.
GOLDEN = os.environ.get("STEPVIDEO_GOLDEN", os.path.join(REPO, "tests", "golden"))


@pytest.fixture(scope="session", autouse=True)
def _cpu_runtime():
    from stepvideo_ms import runtime

    runtime.init("CPU")


@pytest.fixture(scope="session")
def golden_dir():
    if not os.path.isdir(GOLDEN):
        pytest.fail(f"golden data not found at {GOLDEN}: STEPVIDEO_GOLDEN names a missing folder "
                    "(unset it to use the repository's tests/golden)")
    return GOLDEN
