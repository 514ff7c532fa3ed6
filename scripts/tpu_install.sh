#!/usr/bin/env bash
# Install flaxbert and jax[tpu] on every worker of the slice.
# usage: scripts/tpu_install.sh --name bert --zone us-central2-b [--repo URL] [--branch main] [--dry-run]
source "$(dirname "$0")/tpu_common.sh"
usage() { echo "usage: $0 [--repo URL] [--branch BRANCH] [common flags]"; usage_common; }
parse_common "$@"
ssh_all "set -e; python3 -m pip install -U pip 'jax[tpu]' && \
(test -d flaxbert || git clone --branch $BRANCH $REPO_URL flaxbert) && \
cd flaxbert && git fetch origin $BRANCH && git checkout $BRANCH && git pull --ff-only && python3 -m pip install -e ."
