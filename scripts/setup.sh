#!/usr/bin/env bash
# Create .venv (if absent) and install the pinned requirements and this package into it.
# Idempotent: a second run with unchanged requirements does nothing but check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
# one interpreter start both checks the installation and reports it (MindSpore takes seconds to import)
check() { .venv/bin/python -c 'import stepvideo_ms, mindspore, numpy; print("mindspore", mindspore.__version__, "numpy", numpy.__version__)' 2>/dev/null | tail -1; }
ready=""
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
  ready=$(check) || ready=""
fi
if [ -z "$ready" ]; then
  echo "[setup] installing requirements (MindSpore is a large wheel: this takes a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  # the editable install's build backend prints beta-configuration notices: keep them in a log
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . > .venv/install-package.log 2>&1 \
    || { cat .venv/install-package.log >&2; exit 1; }
  echo "$want" > "$stamp"
  ready=$(check) || { echo "[setup] the installed packages do not import: .venv/bin/python -c 'import stepvideo_ms, mindspore'" >&2; exit 1; }
fi
echo "[setup] ready: $ready"
