"""scripts/: the TPU VM and SLURM scripts print the right commands under --dry-run (nothing runs)."""

import os
import shlex
import subprocess


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args, env=None):
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", script), *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin", **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def test_create_pod_slice():
    argv = _dry("tpu_create.sh", "--dry-run", "--name", "bert", "--zone", "europe-west4-a", "--accelerator", "v4-32",
                "--project", "proj", "--spot")
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "bert"]
    assert {"--zone=europe-west4-a", "--accelerator-type=v4-32", "--project=proj", "--spot"} <= set(argv)
    assert any(a.startswith("--version=") for a in argv)


def test_install_runs_on_every_worker():
    argv = _dry("tpu_install.sh", "--dry-run", "--name", "bert", "--branch", "dev")
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bert"] and "--worker=all" in argv
    command = [a for a in argv if a.startswith("--command=")][0]
    assert "jax[tpu]" in command and "pip install -e ." in command and "--branch dev" in command


def test_run_sends_the_same_command_to_all_workers():
    argv = _dry("tpu_run.sh", "--dry-run", "--name", "bert", "--", "python3", "-m", "flaxbert.pretrain",
                "--config", "bert_base_phase1", "--optim.lr=2e-4")
    assert "--worker=all" in argv
    command = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
    assert "python3 -m flaxbert.pretrain --config bert_base_phase1 --optim.lr=2e-4" in command
    assert "flaxbert.log" in command


def test_logs_and_delete():
    logs = _dry("tpu_logs.sh", "--dry-run", "--name", "bert", "--worker", "3")
    assert "--worker=3" in logs and any("tail" in a for a in logs)
    delete = _dry("tpu_delete.sh", "--dry-run", "--name", "bert", "--zone", "us-east5-a")
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "bert"] and "--zone=us-east5-a" in delete


def test_without_dry_run_the_printed_command_is_what_runs(tmp_path):
    """A stub `gcloud` first on PATH records its arguments: they equal the dry run's."""
    stub = tmp_path / "gcloud"
    stub.write_text('#!/bin/bash\nprintf "%q " "$@" > "$(dirname "$0")/args"\n')
    stub.chmod(0o755)
    args = ["--name", "bert", "--zone", "us-east5-a"]
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "tpu_delete.sh"), *args], capture_output=True,
                          text=True, env={**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ["gcloud"] + shlex.split((tmp_path / "args").read_text()) == _dry("tpu_delete.sh", "--dry-run", *args)


def test_slurm_example_launches_one_task_per_node():
    argv = _dry("slurm_gpu.sbatch", "--config", "bert_base_phase1", env={"DRY_RUN": "1"})
    assert argv[0] == "srun" and argv[-2:] == ["--config", "bert_base_phase1"]
    assert ["-m", "flaxbert.pretrain"] == argv[argv.index("python3") + 1:argv.index("python3") + 3]
    text = open(os.path.join(REPO, "scripts", "slurm_gpu.sbatch")).read()
    assert "#SBATCH --ntasks-per-node=1" in text and "--signal=B:TERM" in text
