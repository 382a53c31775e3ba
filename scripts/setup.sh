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
# the installation is checked without importing MindSpore (seconds): every package is found, at its version
check() {
  .venv/bin/python -P - <<'PY' 2>/dev/null | tail -1
import importlib.metadata as md, importlib.util as iu
missing = [m for m in ("stepvideo_ms", "mindspore", "numpy") if iu.find_spec(m) is None]
if missing:
    raise SystemExit(1)
print("mindspore", md.version("mindspore"), "numpy", md.version("numpy"))
PY
}
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
