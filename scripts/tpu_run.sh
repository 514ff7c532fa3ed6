#!/usr/bin/env bash
# Run the same command on all workers (jax.distributed.initialize() finds the others on a TPU VM).
# Output goes to ~/flaxbert.log on each worker; follow it with tpu_logs.sh.
# usage: scripts/tpu_run.sh --name bert -- python3 -m flaxbert.pretrain --config bert_base_phase1 \
#            --run.output_dir=gs://BUCKET/bert_base [--dry-run]
source "$(dirname "$0")/tpu_common.sh"
usage() { echo "usage: $0 [common flags] -- COMMAND..."; usage_common; }
parse_common "$@"
if [[ ${#REST[@]} -eq 0 ]]; then
  REST=(python3 -m flaxbert.pretrain)
fi
CMD="$(printf '%q ' "${REST[@]}")"
ssh_all "cd flaxbert && nohup ${CMD}> ~/flaxbert.log 2>&1 &"
