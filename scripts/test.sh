#!/usr/bin/env bash
# Set up the environment, then run the default (fast) test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLOG_v=${GLOG_v:-3}
exec .venv/bin/python -m pytest -q "$@"
