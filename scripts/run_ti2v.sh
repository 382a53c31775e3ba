#!/usr/bin/env bash
# Step-Video-TI2V on Ascend with msrun: 4 cards (ulysses 2 x pp 2) or 8 cards (ulysses 4 x pp 2).
#
#   bash scripts/run_ti2v.sh --model_dir DIR --first_image_path IMG [--motion_score 5] [--cards 4|8]
#        [--caption_url URL] [--vae_url URL] [--prompt "..."] [--dry-run] [-- other run_parallel.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/launch_msrun.sh --task ti2v "$@"
