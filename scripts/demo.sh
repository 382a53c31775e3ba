#!/usr/bin/env bash
# The whole product on the embedded tiny model, on CPU, as a user runs it on Ascend, with the same
# scripts: build the tiny random-weight model directories, start_servers.sh (caption + VAE server),
# run_t2v.sh (cards 0,1, ulysses 2) and run_ti2v.sh (cards 2,3, pp 2, first frame assets/demo.png) side
# by side on the one pair of servers, stop_servers.sh. Every process it starts is ended on success,
# on failure and on Ctrl-C: nothing is left running.
#
#   bash scripts/demo.sh [OUT_DIR] [--verbose]      (default OUT_DIR: outputs/demo in the repository)
#
# The weights are random: the videos show that every stage runs, not a meaningful picture.
set -euo pipefail
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$SCRIPTS")
OUT="" VERBOSE=()
for a in "$@"; do
  case "$a" in
    -h|--help) echo "usage: bash scripts/demo.sh [OUT_DIR] [--verbose]"; sed -n '2,6p;10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0;;
    --verbose) VERBOSE=(--verbose);;
    -*) echo "demo.sh: unknown option $a (see --help)" >&2; exit 2;;
    *) OUT=$a;;
  esac
done
OUT=$(mkdir -p "${OUT:-$ROOT/outputs/demo}" && cd "${OUT:-$ROOT/outputs/demo}" && pwd)
START=$(date +%s)
bash "$SCRIPTS/setup.sh"
source "$SCRIPTS/python_env.sh"  # PY: the environment setup.sh made
LOGS=$OUT/logs
mkdir -p "$LOGS"
RUN=$(mktemp -d)  # the background jobs' PIDs and exit codes

# Every process the demo starts is ended on success, failure and Ctrl-C: the background builds and
# jobs (a job's msrun_job.py stops its msrun world on SIGTERM), then the servers.
JOB_NAMES=()
cleanup() {
  for name in "${JOB_NAMES[@]}"; do
    [ -e "$RUN/$name.rc" ] && continue  # ended: its PID may be another process's by now
    pid=$(cat "$RUN/$name.pid" 2>/dev/null || true)
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  bash "$SCRIPTS/stop_servers.sh" --log_dir "$LOGS" > /dev/null 2>&1 || true
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_job NAME [--log FILE] COMMAND...: runs COMMAND in the background, each of its lines prefixed
# with [NAME] (with --log: written to FILE, shown if it fails); its PID goes to $RUN/NAME.pid and its
# exit code to $RUN/NAME.rc
start_job() {
  local name=$1 log=""; shift
  if [ "$1" = --log ]; then log=$2; echo "$log" > "$RUN/$name.log"; shift 2; fi
  rm -f "$RUN/$name.pid" "$RUN/$name.rc"
  JOB_NAMES+=("$name")
  { if [ -n "$log" ]; then "$@" > "$log" 2>&1 & else "$@" 2>&1 & fi
    echo $! > "$RUN/$name.pid"; wait $! && rc=0 || rc=$?; echo "$rc" > "$RUN/$name.rc"; } \
    | sed -u "s/^/[$name] /" &
}
job_rc() { cat "$RUN/$1.rc" 2>/dev/null || echo running; }

# finish_jobs NAME...: waits for the named jobs; the first failure stops the others and ends the demo
finish_jobs() {
  local left=$# name rc waited
  while [ "$left" -gt 0 ]; do
    wait -n && waited=0 || waited=$?
    left=0
    for name in "$@"; do
      rc=$(job_rc "$name")
      case "$rc" in
        running) left=$((left + 1));;
        0) ;;
        *) [ -e "$RUN/$name.log" ] && cat "$(cat "$RUN/$name.log")" >&2
           echo "[demo] $name failed (exit $rc); the logs are in $LOGS" >&2; exit "$rc";;
      esac
    done
    if [ "$left" -gt 0 ] && [ "$waited" = 127 ]; then  # nothing left to wait for, yet no exit code
      echo "[demo] a job ended without reporting its exit code; the logs are in $LOGS" >&2; exit 1
    fi
  done
}

# The two tiny models are independent: built side by side, one per core.
echo "[demo] building the tiny model directories"
for task in t2v ti2v; do
  rm -f "$LOGS/tiny_$task.log"
  start_job "tiny_$task" --log "$LOGS/tiny_$task.log" "$PY" -P -m stepvideo_ms tiny "$OUT/tiny_$task" --task "$task" --force
done
finish_jobs tiny_t2v tiny_ti2v

# The tiny T2V and TI2V directories share their text encoders and VAE (same seed), so one pair of
# servers serves both runs, as one pair serves both tasks' released weights.
echo "[demo] starting the caption server and the VAE server"
URLS=$(bash "$SCRIPTS/start_servers.sh" --model_dir "$OUT/tiny_t2v" --caption_port 0 --vae_port 0 --log_dir "$LOGS" \
       "${VERBOSE[@]}" | tail -1)
echo "[demo] servers ready: $URLS"
read -r -a URL_ARGS <<< "$URLS"
# two 17-frame chunks (the VAE blends them), 4 steps, a small picture: the decode runs at the video's size
SMALL=(--num_frames 34 --height 48 --width 80 --infer_steps 4 --seed 42 --overwrite)

# Both jobs at once, on different cards, sharing the servers (they queue the requests): as on a host
# of several cards, where each DiT job takes its own cards and one pair of servers serves them all.
echo "[demo] T2V on cards 0,1 (ulysses 2) and TI2V on cards 2,3 (pp 2, first frame assets/demo.png), side by side"
start_job t2v bash "$SCRIPTS/run_t2v.sh" --model_dir "$OUT/tiny_t2v" --cards 0,1 --ulysses 2 --pp 1 "${URL_ARGS[@]}" \
  --save_path "$OUT" --log_dir "$LOGS/msrun_t2v" --prompt "A red house under a yellow sun, the camera slowly pushes in" \
  "${VERBOSE[@]}" --output_file_name t2v_demo "${SMALL[@]}"
start_job ti2v bash "$SCRIPTS/run_ti2v.sh" --model_dir "$OUT/tiny_ti2v" --cards 2,3 --ulysses 1 --pp 2 "${URL_ARGS[@]}" \
  --save_path "$OUT" --log_dir "$LOGS/msrun_ti2v" --prompt "镜头缓慢推进，太阳升起" --first_image_path "$ROOT/assets/demo.png" \
  --motion_score 5 "${VERBOSE[@]}" --output_file_name ti2v_demo "${SMALL[@]}"
finish_jobs t2v ti2v

bash "$SCRIPTS/stop_servers.sh" --log_dir "$LOGS" > /dev/null
for f in "$OUT/t2v_demo.mp4" "$OUT/ti2v_demo.mp4"; do
  [ -s "$f" ] || { echo "[demo] expected $f was not written" >&2; exit 1; }
done
echo "[demo] done in $(( $(date +%s) - START )) s: $OUT/t2v_demo.mp4, $OUT/ti2v_demo.mp4 (each with its .json)"
