#!/usr/bin/env bash
# Step-Video-T2V on Ascend with msrun: 4 cards (ulysses 2 x pp 2) or 8 cards (ulysses 4 x pp 2).
#
#   bash scripts/run_t2v.sh --model_dir DIR [--cards 4|8] [--caption_url URL] [--vae_url URL]
#        [--prompt "..."] [--dry-run] [-- any other run_parallel.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/launch_msrun.sh --task t2v "$@"
