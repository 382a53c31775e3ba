#!/usr/bin/env bash
# Start the caption server (Step-1 LLM + HunyuanCLIP) and the VAE server, each on its own Ascend
# card, for the released weights. Prints the --caption_url / --vae_url to give run_parallel.py.
#
#   bash scripts/start_servers.sh --model_dir /data/stepfun-ai/stepvideo-t2v [--caption_card 6]
#        [--vae_card 7] [--host 127.0.0.1] [--caption_port 5000] [--vae_port 5001] [--log_dir logs] [--dry-run]
#
# Set STEPVIDEO_AUTH_TOKEN to require a token on every request (give the same value to run_parallel.py).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR="" CAPTION_CARD=6 VAE_CARD=7 HOST=127.0.0.1 CAPTION_PORT=5000 VAE_PORT=5001 LOG_DIR=logs DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model_dir) MODEL_DIR=$2; shift 2;;
    --caption_card) CAPTION_CARD=$2; shift 2;;
    --vae_card) VAE_CARD=$2; shift 2;;
    --host) HOST=$2; shift 2;;
    --caption_port) CAPTION_PORT=$2; shift 2;;
    --vae_port) VAE_PORT=$2; shift 2;;
    --log_dir) LOG_DIR=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    *) echo "start_servers.sh: unknown argument $1 (see the header of this script)" >&2; exit 2;;
  esac
done
[ -n "$MODEL_DIR" ] || { echo "start_servers.sh: --model_dir is required (the downloaded model directory)" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
caption_cmd="ASCEND_RT_VISIBLE_DEVICES=$CAPTION_CARD $PY api/call_remote_server.py --model_dir $MODEL_DIR --enable_llm True --enable_vae False --host $HOST --port $CAPTION_PORT --device_id 0"
vae_cmd="ASCEND_RT_VISIBLE_DEVICES=$VAE_CARD $PY api/call_remote_server.py --model_dir $MODEL_DIR --enable_llm False --enable_vae True --host $HOST --port $VAE_PORT --device_id 0"
if [ "$DRY" = 1 ]; then
  echo "$caption_cmd > $LOG_DIR/caption_server.log 2>&1 &"
  echo "$vae_cmd > $LOG_DIR/vae_server.log 2>&1 &"
  echo "--caption_url http://$HOST:$CAPTION_PORT --vae_url http://$HOST:$VAE_PORT"
  exit 0
fi
[ -d "$MODEL_DIR" ] || { echo "start_servers.sh: --model_dir $MODEL_DIR does not exist" >&2; exit 2; }
mkdir -p "$LOG_DIR"
eval "$caption_cmd" > "$LOG_DIR/caption_server.log" 2>&1 &
echo "caption server: pid $! on card $CAPTION_CARD, log $LOG_DIR/caption_server.log"
eval "$vae_cmd" > "$LOG_DIR/vae_server.log" 2>&1 &
echo "vae server: pid $! on card $VAE_CARD, log $LOG_DIR/vae_server.log"
echo "when both logs say ready, pass: --caption_url http://$HOST:$CAPTION_PORT --vae_url http://$HOST:$VAE_PORT"
