#!/usr/bin/env bash
# Delete the TPU VM / pod slice (checkpoints on gs:// are kept).
# usage: scripts/tpu_delete.sh --name bert --zone us-central2-b [--dry-run]
source "$(dirname "$0")/tpu_common.sh"
usage() { echo "usage: $0 [common flags]"; usage_common; }
parse_common "$@"
run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
