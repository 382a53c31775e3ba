#!/usr/bin/env bash
# Start the caption server (Step-1 + HunyuanCLIP) and the VAE server as real processes, each on its
# own card; wait until both answer /health; print the URLs to give run_t2v.sh / run_ti2v.sh.
# Their pids go to a run file (LOG_DIR/servers.json); stop them with scripts/stop_servers.sh.
#
#   bash scripts/start_servers.sh --model_dir /data/stepfun-ai/stepvideo-t2v [--caption_card 6]
#        [--vae_card 7] [--host 127.0.0.1] [--caption_port 5000] [--vae_port 5001] [--log_dir logs]
#        [--device Ascend|CPU] [--stop] [--dry-run]          (--help for all options)
#
# Set STEPVIDEO_AUTH_TOKEN to require a token on every request (give run_parallel.py the same).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
exec "$PY" -P -m stepvideo_ms.deploy.servers "$@"
