#!/usr/bin/env bash
# The tests marked `slow` (kept out of the default run and CI for time): the real default
# `python -m flaxbert.pretrain` from a fresh output directory, a two-process CLI run that checkpoints
# and resumes, the loop with the pmap layout, kill -9 during an asynchronous save and a full disk, ELECTRA's CoNLL-2003 and SQuAD runs
# through the fine-tuning CLI, the device check's smoke mode (`python -m benchmarks.device_check --smoke`)
# and two of the unscanned remat variants. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m slow "$@"
