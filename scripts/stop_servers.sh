#!/usr/bin/env bash
# Stop exactly the servers that start_servers.sh started (from its run file), SIGTERM then SIGKILL.
#
#   bash scripts/stop_servers.sh [--log_dir logs | --run_file logs/servers.json]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
case " $* " in
  *" --help "*|*" -h "*) echo "usage: stop_servers.sh [--log_dir DIR | --run_file FILE]"
    echo "Stop the servers recorded in the run file of start_servers.sh (default logs/servers.json)."; exit 0;;
esac
exec "$PY" -P -m stepvideo_ms.deploy.servers --stop "$@"
