#!/usr/bin/env bash
# The whole product on the embedded tiny model, on CPU, as a user runs it on Ascend:
# build the tiny random-weight model directories, start the caption server and the VAE server,
# run run_parallel.py under msrun (ulysses 2) for T2V, then TI2V from assets/demo.png, and write
# both MP4s (with their JSON records). The servers are stopped on success and on failure.
#
#   bash scripts/demo.sh [OUT_DIR]        (default: outputs/demo)
#
# The weights are random: the videos show that every stage runs, not a meaningful picture.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/demo}
START=$(date +%s)
bash scripts/setup.sh
export GLOG_v=${GLOG_v:-3}
PY=.venv/bin/python
mkdir -p "$OUT/logs"

echo "[demo] building the tiny model directories"
$PY -m stepvideo_ms.tiny "$OUT/tiny_t2v" --task t2v --force
$PY -m stepvideo_ms.tiny "$OUT/tiny_ti2v" --task ti2v --force

PIDS=()
stop_servers() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_servers EXIT

start_server() {  # name, flags... -> prints the URL the server announces
  local name=$1; shift
  local log="$OUT/logs/$name.log"
  $PY api/call_remote_server.py --model_dir "$OUT/tiny_t2v" --host 127.0.0.1 --port 0 "$@" > "$log" 2>&1 &
  PIDS+=($!)
  local pid=$!
  for _ in $(seq 1 240); do
    if grep -q "pass to run_parallel.py" "$log"; then
      grep -o "http://127.0.0.1:[0-9]*" "$log" | tail -1
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { echo "[demo] the $name server exited:" >&2; tail -20 "$log" >&2; return 1; }
    sleep 0.5
  done
  echo "[demo] the $name server did not become ready in 120 s (log: $log)" >&2
  return 1
}

# The tiny T2V and TI2V directories share their text encoders and VAE (same seed), so one pair of
# servers serves both runs, as one pair serves both tasks' released weights.
echo "[demo] starting the caption server and the VAE server"
CAPTION_URL=$(start_server caption --enable_llm True --enable_vae False)
VAE_URL=$(start_server vae --enable_llm False --enable_vae True)
echo "[demo] caption server $CAPTION_URL, VAE server $VAE_URL"

MSRUN=(.venv/bin/msrun --worker_num=2 --local_worker_num=2 --join=True)
COMMON=(--caption_url "$CAPTION_URL" --vae_url "$VAE_URL" --ulysses_degree 2 --pp_degree 1
        --num_frames 34 --height 128 --width 192 --infer_steps 4 --seed 42 --save_path "$OUT")

free_port() { $PY -c "from stepvideo_ms.parallel.msrun import free_port; print(free_port())"; }

echo "[demo] T2V: msrun, 2 workers (ulysses 2)"
PATH="$PWD/.venv/bin:$PATH" "${MSRUN[@]}" --master_port="$(free_port)" --log_dir="$OUT/logs/msrun_t2v" \
  run_parallel.py --model_dir "$OUT/tiny_t2v" --prompt "A red house under a yellow sun, the camera slowly pushes in" \
  --output_file_name t2v_demo "${COMMON[@]}" \
  || { echo "[demo] T2V failed; worker logs in $OUT/logs/msrun_t2v" >&2; tail -30 "$OUT"/logs/msrun_t2v/worker_0.log >&2; exit 1; }

echo "[demo] TI2V: msrun, 2 workers (ulysses 2), first frame assets/demo.png"
PATH="$PWD/.venv/bin:$PATH" "${MSRUN[@]}" --master_port="$(free_port)" --log_dir="$OUT/logs/msrun_ti2v" \
  run_parallel.py --model_dir "$OUT/tiny_ti2v" --prompt "镜头缓慢推进，太阳升起" --first_image_path assets/demo.png \
  --motion_score 5 --output_file_name ti2v_demo "${COMMON[@]}" \
  || { echo "[demo] TI2V failed; worker logs in $OUT/logs/msrun_ti2v" >&2; tail -30 "$OUT"/logs/msrun_ti2v/worker_0.log >&2; exit 1; }

for f in "$OUT/t2v_demo.mp4" "$OUT/ti2v_demo.mp4"; do
  [ -s "$f" ] || { echo "[demo] expected $f was not written" >&2; exit 1; }
done
echo "[demo] done in $(( $(date +%s) - START )) s:"
echo "  $OUT/t2v_demo.mp4  ($OUT/t2v_demo.json)"
echo "  $OUT/ti2v_demo.mp4 ($OUT/ti2v_demo.json)"
