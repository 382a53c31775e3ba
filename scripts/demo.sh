#!/usr/bin/env bash
# The whole product on the embedded tiny model, on CPU, as a user runs it on Ascend, with the same
# scripts: build the tiny random-weight model directories, start_servers.sh (caption + VAE server),
# run_t2v.sh (ulysses 2) and run_ti2v.sh (pp 2, first frame assets/demo.png), stop_servers.sh.
# The servers are stopped on success, on failure and on Ctrl-C: nothing is left running.
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
    -h|--help) echo "usage: bash scripts/demo.sh [OUT_DIR] [--verbose]"; sed -n '2,5p;9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0;;
    --verbose) VERBOSE=(--verbose);;
    -*) echo "demo.sh: unknown option $a (see --help)" >&2; exit 2;;
    *) OUT=$a;;
  esac
done
OUT=$(mkdir -p "${OUT:-$ROOT/outputs/demo}" && cd "${OUT:-$ROOT/outputs/demo}" && pwd)
START=$(date +%s)
bash "$SCRIPTS/setup.sh"
PY=$ROOT/.venv/bin/python
LOGS=$OUT/logs
mkdir -p "$LOGS"

echo "[demo] building the tiny model directories"
for task in t2v ti2v; do
  "$PY" -P -m stepvideo_ms tiny "$OUT/tiny_$task" --task "$task" --force > "$LOGS/tiny_$task.log" 2>&1 \
    || { cat "$LOGS/tiny_$task.log" >&2; exit 1; }
done

stop() { bash "$SCRIPTS/stop_servers.sh" --log_dir "$LOGS" > /dev/null 2>&1 || true; }
trap stop EXIT
trap 'exit 130' INT TERM

# The tiny T2V and TI2V directories share their text encoders and VAE (same seed), so one pair of
# servers serves both runs, as one pair serves both tasks' released weights.
echo "[demo] starting the caption server and the VAE server"
URLS=$(bash "$SCRIPTS/start_servers.sh" --model_dir "$OUT/tiny_t2v" --caption_port 0 --vae_port 0 --log_dir "$LOGS" \
       "${VERBOSE[@]}" | tail -1)
echo "[demo] servers ready: $URLS"
read -r -a URL_ARGS <<< "$URLS"
# two 17-frame chunks (the VAE blends them), 4 steps, a small picture: the decode runs at the video's size
SMALL=(--num_frames 34 --height 48 --width 80 --infer_steps 4 --seed 42 --overwrite)

echo "[demo] T2V: msrun, 2 workers (ulysses 2)"
bash "$SCRIPTS/run_t2v.sh" --model_dir "$OUT/tiny_t2v" --ulysses 2 --pp 1 "${URL_ARGS[@]}" --save_path "$OUT" \
  --log_dir "$LOGS/msrun_t2v" --prompt "A red house under a yellow sun, the camera slowly pushes in" "${VERBOSE[@]}" \
  --output_file_name t2v_demo "${SMALL[@]}"

echo "[demo] TI2V: msrun, 2 workers (pp 2), first frame assets/demo.png"
bash "$SCRIPTS/run_ti2v.sh" --model_dir "$OUT/tiny_ti2v" --ulysses 1 --pp 2 "${URL_ARGS[@]}" --save_path "$OUT" \
  --log_dir "$LOGS/msrun_ti2v" --prompt "镜头缓慢推进，太阳升起" --first_image_path "$ROOT/assets/demo.png" \
  --motion_score 5 "${VERBOSE[@]}" --output_file_name ti2v_demo "${SMALL[@]}"

bash "$SCRIPTS/stop_servers.sh" --log_dir "$LOGS" > /dev/null
for f in "$OUT/t2v_demo.mp4" "$OUT/ti2v_demo.mp4"; do
  [ -s "$f" ] || { echo "[demo] expected $f was not written" >&2; exit 1; }
done
echo "[demo] done in $(( $(date +%s) - START )) s: $OUT/t2v_demo.mp4, $OUT/ti2v_demo.mp4 (each with its .json)"
