#!/usr/bin/env bash
# Follow the log of one worker (process 0 writes the progress bar and metrics; default worker 0).
# usage: scripts/tpu_logs.sh --name bert [--worker 0] [--dry-run]
source "$(dirname "$0")/tpu_common.sh"
usage() { echo "usage: $0 [--worker N] [common flags]"; usage_common; }
WORKER=0
ARGS=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--worker" ]]; then WORKER="$2"; shift 2; else ARGS+=("$1"); shift; fi
done
parse_common "${ARGS[@]+"${ARGS[@]}"}"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker="$WORKER" \
  --command="tail -n 200 -f ~/flaxbert.log"
