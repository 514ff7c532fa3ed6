#!/usr/bin/env bash
# The tests marked `slow` (kept out of the default run and CI for time): the real default
# `python -m flaxbert.pretrain` from a fresh output directory, a two-process CLI run that checkpoints
# and resumes, the device check's smoke mode (`python -m benchmarks.device_check --smoke`) and two of the
# unscanned remat variants. About 7 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m slow "$@"
