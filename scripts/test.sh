#!/usr/bin/env bash
# Set up the environment, then run the default (fast) test suite. Extra arguments go to pytest.
set -euo pipefail
case " $* " in
  *" --help "*|*" -h "*) cat <<'HELP'
usage: bash scripts/test.sh [PYTEST ARGUMENTS]

Creates .venv if absent (scripts/setup.sh; STEPVIDEO_MINDSPORE=VERSION and STEPVIDEO_VENV=DIR run the
suite on another MindSpore in its own environment), then runs the default test suite with pytest -q:
every test under tests/ except those marked `slow`, on MindSpore's CPU backend with the tiny
random-weight model (real msrun workers, real servers, the Ascend simulation, the web page in
headless Chromium when `chromium` is installed). About 17 minutes on 2 cores (2.10.0; 27 on 2.7.0).

Extra arguments go to pytest, for example:
  bash scripts/test.sh tests/test_plan.py               one file (seconds to a minute)
  bash scripts/test.sh tests/test_api.py -k readme -x   one test by name, stop at the first failure
  bash scripts/test.sh -m slow                          only the slow tests (longer runs, larger sizes)
  bash scripts/test.sh -m "slow or not slow"            everything
  bash scripts/test.sh --co -q                          list the tests without running them
pytest's own options: .venv/bin/python -m pytest --help
HELP
  exit 0;;
esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLOG_v=${GLOG_v:-3}
VENV=${STEPVIDEO_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV=$(pwd)/$VENV;; esac
export STEPVIDEO_VENV=$VENV  # the scripts the tests run use the same environment
exec "$VENV/bin/python" -m pytest -q "$@"
