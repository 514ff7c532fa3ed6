# Shared by the tpu_*.sh scripts: flags, defaults and a `run` that only prints under --dry-run.
# Every setting can be given as a flag or an environment variable (flag wins).
set -euo pipefail

TPU_NAME="${TPU_NAME:-flaxbert}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO_URL="${REPO_URL:-https://github.com/flaxbert/flaxbert.git}"
BRANCH="${BRANCH:-main}"
SPOT="${SPOT:-0}"
DRY_RUN=0
REST=()

usage_common() {
  cat <<USAGE
common flags:
  --name NAME            TPU VM / pod slice name           (TPU_NAME, default flaxbert)
  --zone ZONE            GCP zone                          (ZONE, default us-central2-b)
  --project PROJECT      GCP project (default: gcloud's)   (PROJECT)
  --dry-run              print the gcloud commands instead of running them
USAGE
}

parse_common() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) TPU_NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --accelerator) ACCELERATOR="$2"; shift 2 ;;
      --runtime) RUNTIME="$2"; shift 2 ;;
      --repo) REPO_URL="$2"; shift 2 ;;
      --branch) BRANCH="$2"; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; REST+=("$@"); break ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  PROJECT_FLAG=()
  if [[ -n "$PROJECT" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi
}

# Print the command (shell-quoted) under --dry-run, else run it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

# gcloud ... ssh to every worker of the slice with one command line.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}
