#!/usr/bin/env bash
# Shared launcher of run_t2v.sh / run_ti2v.sh: builds the msrun command line for 4 or 8 cards.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK="" MODEL_DIR="" CARDS=4 CAPTION_URL=http://127.0.0.1:5000 VAE_URL=http://127.0.0.1:5001
PROMPT="" IMAGE="" MOTION="" PORT=${MASTER_PORT:-29500} LOG_DIR=logs/msrun DRY=0 EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --task) TASK=$2; shift 2;;
    --model_dir) MODEL_DIR=$2; shift 2;;
    --cards) CARDS=$2; shift 2;;
    --caption_url) CAPTION_URL=$2; shift 2;;
    --vae_url) VAE_URL=$2; shift 2;;
    --prompt) PROMPT=$2; shift 2;;
    --first_image_path) IMAGE=$2; shift 2;;
    --motion_score) MOTION=$2; shift 2;;
    --master_port) PORT=$2; shift 2;;
    --log_dir) LOG_DIR=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    --) shift; EXTRA=("$@"); break;;
    *) echo "unknown argument $1 (pass run_parallel.py arguments after --)" >&2; exit 2;;
  esac
done
[ -n "$MODEL_DIR" ] || { echo "--model_dir is required (the downloaded model directory)" >&2; exit 2; }
case "$CARDS" in
  4) ULYSSES=2 PP=2 VISIBLE=0,1,2,3;;
  8) ULYSSES=4 PP=2 VISIBLE=0,1,2,3,4,5,6,7;;
  *) echo "--cards $CARDS is not a prepared layout: use 4 (ulysses 2 x pp 2) or 8 (ulysses 4 x pp 2)" >&2; exit 2;;
esac
if [ "$TASK" = ti2v ]; then
  [ -n "$IMAGE" ] || { echo "TI2V needs --first_image_path IMAGE" >&2; exit 2; }
  PROMPT=${PROMPT:-"笑起来"}
  TASK_ARGS=(--first_image_path "$IMAGE" --motion_score "${MOTION:-5.0}")
else
  PROMPT=${PROMPT:-"一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光"}
  TASK_ARGS=()
fi
PY=${PYTHON:-.venv/bin/python}
MSRUN=${MSRUN:-msrun}
CMD=(env ASCEND_RT_VISIBLE_DEVICES=$VISIBLE "$MSRUN" --worker_num=$CARDS --local_worker_num=$CARDS
     --master_port=$PORT --log_dir=$LOG_DIR --join=True
     "$PY" run_parallel.py --model_dir "$MODEL_DIR" --caption_url "$CAPTION_URL" --vae_url "$VAE_URL"
     --ulysses_degree $ULYSSES --pp_degree $PP --prompt "$PROMPT" "${TASK_ARGS[@]}"
     --infer_steps 50 --cfg_scale 9.0 --time_shift 13.0 "${EXTRA[@]}")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
"${CMD[@]}"
