"""Throughput / MFU accounting and the metrics sinks (jsonl, TensorBoard, PNG)."""

import os
import sys

import pytest

from flaxbert.config import BertConfig
from flaxbert.train import writer as mx


def test_peak_flops_table_and_override():
    assert mx.peak_flops("TPU v4") == 275e12
    assert mx.peak_flops("TPU v5 lite") == 197e12 and mx.peak_flops("TPU v5p") == 459e12
    assert mx.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mx.peak_flops("cpu") is None
    assert mx.peak_flops("cpu", override=1e12) == 1e12


def test_mfu_is_model_flops_over_peak():
    fpt = BertConfig.base().flops_per_token(128)
    t = mx.throughput(0.5, sequences=256, seq_len=128, flops_per_token=fpt, devices=8, peak=275e12)
    assert t["tokens_per_sec"] == pytest.approx(256 * 128 / 0.5) and t["seq_per_sec"] == pytest.approx(512)
    assert t["mfu"] == pytest.approx(fpt * 256 * 128 / 0.5 / (8 * 275e12))
    assert "mfu" not in mx.throughput(0.5, 256, 128, fpt, 8, None)


def test_writer_and_plot(tmp_path):
    w = mx.MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):
        w.write(step, {"loss": 4.0 - step, "mlm_accuracy": 0.1 * step, "lr": 1e-3})
    w.write(2, {"loss": 9.0})  # a resumed run re-logs step 2: the latest record wins
    w.write(3, {"loss": 1.5, "mlm_accuracy": 0.2}, split="eval")
    w.close()
    records = mx.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert mx.latest_by_step(records)[2]["loss"] == 9.0 and mx.latest_by_step(records, "eval")[3]["loss"] == 1.5
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    png = mx.plot(str(tmp_path / "metrics.jsonl"), str(tmp_path / "metrics.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_writer_without_tensorboardx_keeps_the_jsonl(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import fail
    w = mx.MetricsWriter(str(tmp_path))
    w.write(1, {"loss": 2.0})
    w.close()
    assert mx.read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "split": "train", "loss": 2.0}]
    assert "tensorboardX is not installed" in caplog.text and not (tmp_path / "tensorboard").exists()
