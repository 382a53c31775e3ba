#!/usr/bin/env bash
# Create the project's virtual environment (if absent) and install the pinned requirements and this
# package into it. Idempotent: a second run with unchanged requirements does nothing but check.
#
#   bash scripts/setup.sh                               .venv with the pinned MindSpore (requirements.txt)
#   STEPVIDEO_MINDSPORE=2.7.1 bash scripts/setup.sh     that MindSpore from PyPI instead (2.7.0 to 2.10.0)
#   STEPVIDEO_MINDSPORE=system bash scripts/setup.sh    the MindSpore already installed for this machine's
#                                                       CANN (in $PYTHON, default python3): the venv sees it
#                                                       and never replaces it
#   STEPVIDEO_VENV=.venv-ms2.7.0 bash scripts/setup.sh  another environment folder (default .venv); the
#                                                       other scripts use the same variable
# An environment keeps the MindSpore it was made with when STEPVIDEO_MINDSPORE is unset later (test.sh runs
# this script); STEPVIDEO_MINDSPORE=pinned goes back to requirements.txt's.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${STEPVIDEO_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV=$ROOT/$VENV;; esac
say() { echo "[setup] $*"; }
die() { echo "[setup] $*" >&2; exit 2; }
# An environment keeps the MindSpore it was made with: unset STEPVIDEO_MINDSPORE means that one (so that
# test.sh or a later setup.sh never swaps a chosen or the system's MindSpore for the pin); `pinned` asks
# for requirements.txt's again.
CHOICE_FILE=$VENV/.stepvideo_mindspore
if [ -z "${STEPVIDEO_MINDSPORE+set}" ] && [ -f "$CHOICE_FILE" ] && [ -n "$(tr -d "[:space:]" < "$CHOICE_FILE")" ]; then
  STEPVIDEO_MINDSPORE=$(tr -d '[:space:]' < "$CHOICE_FILE")
  say "MindSpore: $STEPVIDEO_MINDSPORE, the one $(basename "$VENV") was made with (STEPVIDEO_MINDSPORE=pinned for requirements.txt's)"
fi
CHOICE=${STEPVIDEO_MINDSPORE:-}
[ "$CHOICE" = pinned ] && CHOICE=""
WANT_MS=$CHOICE

# What to install: the requirements as pinned, with MindSpore (and for `system`, numpy) taken out when
# another MindSpore is asked for. Checked before anything is created or downloaded.
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
PIN=$(sed -n 's/^mindspore==//p' requirements.txt)
SYSTEM_SITE=""
case "$WANT_MS" in
  "") cp requirements.txt "$REQS"; WANT_MS=$PIN;;
  system)
    command -v "$PY" >/dev/null 2>&1 || die "STEPVIDEO_MINDSPORE=system: no interpreter $PY (set PYTHON to the one that has MindSpore)"
    found=$("$PY" -c 'import os, mindspore; print(mindspore.__version__); print(os.path.dirname(os.path.dirname(mindspore.__file__)))' 2>/dev/null) \
      || die "STEPVIDEO_MINDSPORE=system: $PY cannot import mindspore; install MindSpore for your CANN first, or set PYTHON to the interpreter that has it"
    WANT_MS=$(echo "$found" | sed -n 1p); SYSTEM_SITE=$(echo "$found" | sed -n 2p)
    "$PY" stepvideo_ms/versions.py check "$WANT_MS" || die "STEPVIDEO_MINDSPORE=system: found MindSpore $WANT_MS in $SYSTEM_SITE"
    grep -v -E '^(mindspore|numpy)==' requirements.txt > "$REQS";;
  *)
    "$PY" stepvideo_ms/versions.py check "$WANT_MS" || die "set STEPVIDEO_MINDSPORE to a version in that range, to 'system', or to 'pinned' for $PIN"
    { grep -v '^mindspore==' requirements.txt; echo "mindspore==$WANT_MS"; } > "$REQS";;
esac

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $(basename "$VENV") with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
elif ! "$VENV/bin/python" -m pip --version > /dev/null 2>&1; then  # a creation that was interrupted
  say "$(basename "$VENV") has no pip (its creation was interrupted): making it again"
  "$PY" -m venv --clear "$VENV"
fi
if [ -n "$SYSTEM_SITE" ]; then  # the system's packages come after the venv's own (as --system-site-packages would)
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$SYSTEM_SITE" > "$site/stepvideo_system_mindspore.pth"
fi
stamp=$VENV/.requirements.sha256
want=$(cat "$REQS" pyproject.toml <(echo "$SYSTEM_SITE") | sha256sum | cut -d' ' -f1)
# the installation is checked without importing MindSpore (seconds): every package is found, MindSpore at the
# version asked for
check() {
  "$VENV/bin/python" -P - "$WANT_MS" <<'PY' 2>/dev/null | tail -1
import importlib.metadata as md, importlib.util as iu, sys
missing = [m for m in ("stepvideo_ms", "mindspore", "numpy") if iu.find_spec(m) is None]
if missing or md.version("mindspore") != sys.argv[1]:
    raise SystemExit(1)
print("mindspore", md.version("mindspore"), "numpy", md.version("numpy"))
PY
}
ready=""
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
  ready=$(check) || ready=""
fi
if [ -z "$ready" ]; then
  if [ -n "$SYSTEM_SITE" ]; then
    say "installing requirements beside the system's MindSpore $WANT_MS ($SYSTEM_SITE)"
  else
    say "installing requirements with MindSpore $WANT_MS (a large wheel: this takes a few minutes the first time)"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$REQS"
  # the editable install's build backend prints beta-configuration notices: keep them in a log
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . > "$VENV/install-package.log" 2>&1 \
    || { cat "$VENV/install-package.log" >&2; exit 1; }
  ready=$(check) || { echo "[setup] the installed packages do not import, or MindSpore is not $WANT_MS:" \
                          "$VENV/bin/python -c 'import stepvideo_ms, mindspore'" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
if [ -n "$CHOICE" ]; then echo "$CHOICE" > "$CHOICE_FILE"; else rm -f "$CHOICE_FILE"; fi  # the pin: nothing to keep
if [ -n "$SYSTEM_SITE" ]; then
  where=$("$VENV/bin/python" -P -c 'import importlib.util as iu; print(iu.find_spec("mindspore").origin)')
  case "$where" in "$SYSTEM_SITE"/*) ;; *) echo "[setup] MindSpore in $VENV is not the system's ($where)" >&2; exit 1;; esac
fi
say "ready: $ready ($(basename "$VENV"))"
