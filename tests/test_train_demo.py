"""The README's first command, from a fresh (non-editable) install, run from an empty directory:
MLM accuracy rises well above its start and the checkpoints, metrics, TensorBoard events and plot exist
(acceptance 7). The fast test shortens the run; the slow one runs the real default command."""

import json
import os
import shutil
from pathlib import Path
import subprocess
import sys
import time

import numpy as np
import pytest

from flaxbert.train.writer import latest_by_step, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINNED = Path(__file__).parent / "resources" / "demo-losses-20.json"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install` of a copy of the sources (no deps: they are installed) into a private directory."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    shutil.copytree(os.path.join(REPO, "flaxbert"), src / "flaxbert", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "pyproject.toml"), src)
    (src / "README.md").write_text("flaxbert\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(root / "site"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "site" / "flaxbert" / "resources" / "meditations.txt").is_file()  # shipped as package data
    return str(root / "site")


def _run_default(site, cwd, *overrides):
    env = {**os.environ, "PYTHONPATH": site}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "flaxbert.pretrain", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, time.time() - start


def _check_outputs(run_dir, steps):
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train = latest_by_step(records)
    first, last = train[min(train)], train[max(train)]
    assert max(train) == steps
    assert os.path.isfile(os.path.join(run_dir, "metrics.png")) and os.path.getsize(os.path.join(run_dir, "metrics.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tensorboard")))
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", str(steps)))
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert latest_by_step(records, "eval"), "no held-out evaluation was logged"
    return first, last


def test_shortened_default_run_learns(installed, tmp_path):
    proc, _ = _run_default(installed, tmp_path, "--run.steps=120", "--run.eval_every=60", "--checkpoint.every=60",
                           "--run.progress=false")
    first, last = _check_outputs(tmp_path / "runs" / "tiny", 120)
    assert last["mlm_accuracy"] >= first["mlm_accuracy"] + 0.04, (first, last)
    assert last["mlm_loss"] < first["mlm_loss"] - 1.0, (first, last)
    assert "finished at step 120" in proc.stdout


@pytest.mark.slow
def test_the_default_command(installed, tmp_path):
    """`python -m flaxbert.pretrain` with no arguments: under 5 minutes on 2 cores, MLM accuracy well up."""
    proc, seconds = _run_default(installed, tmp_path)
    first, last = _check_outputs(tmp_path / "runs" / "tiny", 600)
    assert last["mlm_accuracy"] >= 0.1 and last["mlm_accuracy"] >= 3 * max(first["mlm_accuracy"], 0.01)
    assert "mlm_acc" in proc.stderr and "tok/s" in proc.stderr  # the progress bar
    print(f"wall {seconds:.0f}s; final {last}")
    assert seconds < 300


def test_two_fresh_demo_runs_give_bitwise_equal_losses(tmp_path):
    """The demo's vocabulary ships with the package (training one is not repeatable between processes), so two
    fresh runs of the README's command log the same losses, bit for bit."""
    losses = []
    for i in range(2):
        cwd = tmp_path / f"fresh{i}"
        cwd.mkdir()
        proc = subprocess.run([sys.executable, "-m", "flaxbert.pretrain", "--run.steps=20", "--run.log_every=1",
                               "--run.eval_every=0", "--run.progress=false"], cwd=cwd,
                              env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        train = latest_by_step(read_jsonl(str(cwd / "runs" / "tiny" / "metrics.jsonl")))
        losses.append([train[s]["loss"] for s in range(1, 21)])
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0]
    # pinned: the first 20 demo losses as this code computes them on this kind of CPU (XLA:CPU, fp32). A change
    # that is meant to leave training alone (a refactor) must leave them bit for bit; one that changes them on
    # purpose writes the file again (python -m flaxbert.pretrain --run.steps=20 ..., see the file's "how")
    # XLA:CPU's kernels differ by instruction set (AVX2, AVX-512), and with them the last bits of a float32
    # loss (seen: 7.0682044 on one machine, 7.0682039 on another), so across machines the pin holds to 1e-5;
    # any change to the model, its initialisation or the data moves these losses by far more.
    pinned = [float.fromhex(h) for h in json.loads(PINNED.read_text())["losses"]]
    np.testing.assert_allclose(losses[0], pinned, rtol=1e-5, err_msg="the demo's first 20 losses moved")
