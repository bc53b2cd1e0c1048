#!/usr/bin/env bash
# Submit a raytp script as a Ray job, with this checkout as its working directory.
#   cluster/submit.sh examples/ray_job.py --tp 2
# RAY_ADDRESS defaults to the job server on loopback (a local head, or a tunnel from
# `ray attach cluster/ray-cluster.yaml -p 8265`). Token authentication stays on.
set -euo pipefail
script=${1:?usage: cluster/submit.sh SCRIPT [ARGS...]}
shift
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && ! -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
  echo "no Ray token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token" >&2
  exit 2
fi
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . \
  -- python "$script" "$@"
