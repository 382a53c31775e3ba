# Sourced by the scripts: ROOT (the repository) and PY (the project's interpreter), from any working
# directory; the caller's directory is kept, so relative paths mean what the user typed. Run Python
# with -P: the current directory must not come first on sys.path (another checkout there would win).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${STEPVIDEO_VENV:-.venv}  # the environment scripts/setup.sh made (absolute, or relative to the repository)
case "$VENV" in /*) ;; *) VENV=$ROOT/$VENV;; esac
PY=${PYTHON:-$VENV/bin/python}
if [ ! -x "$PY" ]; then
  echo "$(basename "$0"): $PY not found: run 'bash $ROOT/scripts/setup.sh' first (or set PYTHON)" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
