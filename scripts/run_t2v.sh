#!/usr/bin/env bash
# Step-Video-T2V with msrun, any layout: world = --ulysses N x --pp M workers (default 2 x 2),
# on one host or several (--nnodes --node_rank --master_addr --master_port). Validates everything
# before msrun starts; run from any directory (paths are taken from yours).
#
#   bash scripts/run_t2v.sh --model_dir DIR [--ulysses 4 --pp 2] [--cards 0,1,2,3,4,5,6,7]
#        [--preset t2v|t2v-turbo] [--caption_url URL] [--vae_url URL] [--prompt "..."]
#        [--save_path DIR] [--dry-run] [--verbose] [-- any other run_parallel.py arguments]
#   bash scripts/run_t2v.sh --help
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch_msrun.sh" --task t2v "$@"
