#!/usr/bin/env bash
# Shared launcher of run_t2v.sh / run_ti2v.sh (stepvideo_ms/deploy/msrun_job.py): validates the
# arguments once, then runs run_parallel.py under msrun with the project's interpreter.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
exec "$PY" -P -m stepvideo_ms.deploy.msrun_job "$@"
