#!/usr/bin/env bash
# Create a TPU VM or a pod slice (the accelerator type decides: v4-8 is one host, v4-32 four).
# usage: scripts/tpu_create.sh --name bert --zone us-central2-b --accelerator v4-32 [--spot] [--dry-run]
source "$(dirname "$0")/tpu_common.sh"
usage() { echo "usage: $0 [--accelerator TYPE] [--runtime VERSION] [--spot] [common flags]"; usage_common; }
parse_common "$@"
EXTRA=()
if [[ "$SPOT" == 1 ]]; then EXTRA+=(--spot); fi
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
  --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${EXTRA[@]}"
