#!/bin/sh
# Container entrypoint: turns TRTSERVE_* environment variables into `trtserve serve` flags.
# Extra arguments given to `docker run IMAGE ...` are appended (and win, being last).
# `exec` makes trtserve PID 1's replacement, so SIGTERM from `docker stop` / the kubelet
# reaches the server directly and starts its graceful drain.
set -eu

set -- \
    --host "${TRTSERVE_HOST:-0.0.0.0}" \
    --grpc-port "${TRTSERVE_GRPC_PORT:-8001}" \
    --http-port "${TRTSERVE_HTTP_PORT:-8000}" \
    --metrics-port "${TRTSERVE_METRICS_PORT:-8002}" \
    --log-level "${TRTSERVE_LOG_LEVEL:-info}" \
    --drain-seconds "${TRTSERVE_DRAIN_SECONDS:-30}" \
    "$@"

# An empty TRTSERVE_MODEL_REPOSITORY means "serve the bundled example repository".
if [ -n "${TRTSERVE_MODEL_REPOSITORY:-}" ]; then
    set -- --model-repository "${TRTSERVE_MODEL_REPOSITORY}" "$@"
fi

exec "${TRTSERVE_BIN:-trtserve}" serve "$@"
