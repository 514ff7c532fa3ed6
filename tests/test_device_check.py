"""The accelerator check stays runnable between device windows: its --smoke mode (the same code paths with
tiny shapes, on this CPU) runs every section and passes its checks, and the files it carries to a bare
machine load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import device_check

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, minilm_dir, data_dir):
    out = tmp_path_factory.mktemp("device-check")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--smoke", "--minilm-dir", str(minilm_dir),
                           "--sst2-dir", str(data_dir / "glue" / "SST-2"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc, out


@pytest.mark.slow  # a 75 s run of the device check's smoke mode: scripts/slow_tests.sh
def test_smoke_runs_every_section_and_passes(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "device-cpu-smoke.json").read_text())
    assert report["passed"] and report["plan"]["name"] == "smoke"
    assert {k: v["status"] for k, v in report["sections"].items()} == dict.fromkeys(
        ("correctness", "attention", "grid", "loader", "finetune", "grid_rest"), "ok")
    assert report["checks"] and all(c["passed"] is True for c in report["checks"]), report["checks"]
    assert "## Pretraining grid" in (out / "device-cpu-smoke.md").read_text()


@pytest.mark.slow  # a 75 s run of the device check's smoke mode: scripts/slow_tests.sh
def test_smoke_compares_every_attention_impl_and_refuses_cudnn_on_cpu(smoke):
    report = json.loads((smoke[1] / "device-cpu-smoke.json").read_text())
    rows = {(r["layout"], r["attention_impl"]): r for r in report["sections"]["attention"]["rows"]}
    assert set(rows) == {(layout, impl) for layout in ("padded", "packed")
                         for impl in ("xla", "dot_product_attention", "cudnn")}
    assert report["sections"]["attention"]["instances_per_packed_row"] >= 2  # packing is exercised
    for (layout, impl), r in rows.items():
        if impl == "cudnn":
            assert r["status"] == "refused" and "attention_impl='cudnn'" in r["error"]
        else:
            assert r["status"] == "ran" and r["outputs"]["rel_l2"] <= 2e-2 and r["gradients"]["rel_l2"] <= 5e-2


@pytest.mark.slow  # a 75 s run of the device check's smoke mode: scripts/slow_tests.sh
def test_smoke_grid_loader_and_finetune_measure_against_peers(smoke):
    sections = json.loads((smoke[1] / "device-cpu-smoke.json").read_text())["sections"]
    cell = sections["grid"]["cells"][0]
    assert [r["contender"] for r in cell["rows"]] == ["flaxbert", "HF PyTorch (eager)"]
    assert cell["rows"][1]["parity_rel_diff"] < 3e-2 and cell["ceiling_flops"] > 0
    assert sections["grid_rest"]["skipped_for_time"] == ["tiny s64 b4 bfloat16"]  # the smoke plan's zero budget
    assert [r["ratio_to_step"] > 0 for r in sections["loader"]["rows"]] == [True, True]
    assert sections["loader"]["step_seconds"] == cell["rows"][0]["step_seconds"]
    assert [r["contender"] for r in sections["finetune"]["rows"]] == ["flaxbert (packed)",
                                                                      "HF PyTorch (dynamic padding)"]


def test_carried_minilm_loads_and_matches_the_original(tmp_path, minilm_dir, data_dir):
    from flaxbert import encode, load_pretrained

    device_check.prepare_carry(str(tmp_path), str(minilm_dir), str(data_dir / "glue" / "SST-2"))
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size < 56 * 2**20  # with the ~1 MiB tree, well inside the 64 MiB that travels to the device machine
    assert (tmp_path / "SST-2" / "train.tsv").is_file() and device_check.weights_dtype(str(tmp_path / "minilm")) == "float16"
    original, carried = load_pretrained(str(minilm_dir), head=None), load_pretrained(str(tmp_path / "minilm"), head=None)
    assert carried.report.missing == [] and carried.config == original.config
    batch = device_check.minilm_batches(carried.tokenizer, device_check.SMOKE)[0]
    a = np.asarray(encode(original.params, batch, original.config).last_hidden_state)
    b = np.asarray(encode(carried.params, batch, carried.config).last_hidden_state)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-3

