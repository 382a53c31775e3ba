#!/usr/bin/env bash
# Step-Video-TI2V with msrun, any layout: world = --ulysses N x --pp M workers (default 2 x 2),
# on one host or several (--nnodes --node_rank --master_addr --master_port). Validates everything
# before msrun starts; run from any directory (paths are taken from yours).
#
#   bash scripts/run_ti2v.sh --model_dir DIR --first_image_path IMG [--motion_score 5]
#        [--ulysses 2 --pp 2] [--cards 0,1,2,3] [--caption_url URL] [--vae_url URL] [--prompt "..."]
#        [--save_path DIR] [--dry-run] [--verbose] [-- any other run_parallel.py arguments]
#   bash scripts/run_ti2v.sh --help
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch_msrun.sh" --task ti2v "$@"
