"""Run config: YAML + dotted overrides, unknown keys with the nearest valid key, typed values, the
resolved config round trip, and the bad-config errors raised before anything compiles (acceptance 6)."""

import dataclasses
import glob
import os
import subprocess
import sys

import pytest

from flaxbert import run_config as rc
from flaxbert.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def test_the_demo_config_is_the_default():
    assert rc.load("tiny") == rc.RunConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_is_valid(path):
    cfg = rc.load(path)
    assert cfg.data.seq_len <= cfg.model.max_position_embeddings
    assert cfg.run.global_batch_size % cfg.run.grad_accum == 0


def test_named_configs_cover_the_recipes():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    assert {"tiny", "bert_base_phase1", "bert_base_phase2", "bert_large_phase1", "bert_large_phase2",
            "continue_from_hf"} <= names
    assert rc.load("bert_large_phase1").optim.name == "lamb" and rc.load("bert_large_phase2").data.seq_len == 512


def test_overrides_are_typed_and_applied_after_the_yaml():
    cfg = rc.load("bert_base_phase1", ["--optim.lr=1e-4", "--mesh.fsdp", "4", "--run.progress=false",
                                       "--model.dtype=float32", "--data.packed=true"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.mesh.fsdp == 4 and cfg.run.progress is False and cfg.data.packed is True
    assert cfg.model.dtype == "float32" and cfg.model.num_hidden_layers == 12


@pytest.mark.parametrize("arg,nearest", [("--optim.lrr=1", "optim.lr"), ("--model.hiden_size=3", "model.hidden_size"),
                                         ("--run.global_batch=8", "run.global_batch_size"),
                                         ("--mesh.fdsp=2", "mesh.fsdp")])
def test_unknown_key_names_the_nearest_valid_key(arg, nearest):
    with pytest.raises(ConfigError, match=f"unknown config key .*did you mean '{nearest}'"):
        rc.load("", [arg])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  weight_decay: 0.01\n  warmup: 10\n")
    with pytest.raises(ConfigError, match="optim.warmup.*did you mean 'optim.warmup_steps'"):
        rc.load(str(path))


@pytest.mark.parametrize("arg,message", [
    ("--run.steps=abc", "run.steps: expected int"), ("--optim.name=sgd", "optim.name='sgd'"),
    ("--run.global_batch_size=30", None), ("--data.seq_len=1024", "longer than model.max_position_embeddings"),
    ("--run.grad_accum=7", "not divisible by run.grad_accum=7"), ("--model.num_attention_heads=3", "not divisible by num_attention_heads"),
])
def test_bad_values_name_the_key(arg, message):
    if message is None:  # 30 is fine on its own: divisibility by the mesh is checked against the devices
        rc.load("", [arg])
        return
    with pytest.raises(ConfigError, match=message):
        rc.load("", [arg])


def test_device_and_vocab_dependent_checks():
    cfg = rc.load("", ["--run.global_batch_size=30", "--mesh.data=4"])
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size mesh.data x mesh.fsdp = 4"):
        rc.validate_for_run(cfg, 4)
    with pytest.raises(ConfigError, match="mesh data=4 x fsdp=1 x tensor=1 = 4 devices, but 8 are available"):
        rc.validate_for_run(cfg, 8)
    with pytest.raises(ConfigError, match="not divisible by the fixed axes"):
        rc.validate_for_run(rc.load("", ["--mesh.fsdp=3"]), 8)
    assert rc.validate_for_run(rc.load("", ["--mesh.fsdp=2", "--mesh.tensor=2"]), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="the vocabulary has 3000 tokens but model.vocab_size=2048"):
        rc.validate_for_run(rc.RunConfig(), 1, vocab_size=3000)
    with pytest.raises(ConfigError, match="pmap is data-parallel only"):
        rc.validate_for_run(rc.load("", ["--run.step_impl=pmap", "--mesh.fsdp=2"]), 2)
    with pytest.raises(ConfigError, match="pmap runs on one host"):
        rc.validate_for_run(rc.load("", ["--run.step_impl=pmap"]), 4, process_count=2)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        rc.validate_for_run(rc.load("", ["--run.global_batch_size=32"]), 6, process_count=3)


def test_resolved_config_round_trips(tmp_path):
    cfg = rc.load("bert_large_phase2", ["--optim.lr=3e-3", "--model.remat_policy=dots"])
    rc.save(cfg, str(tmp_path / "config.yaml"))
    again = rc.load(str(tmp_path / "config.yaml"))
    assert again == cfg
    assert dataclasses.asdict(again)["model"]["remat_policy"] == "dots"


def _cli(*args, devices=1):
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + f" --xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-m", "flaxbert.pretrain", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("args,devices,message", [
    (["--optim.lrr=1"], 1, "did you mean 'optim.lr'"),
    (["--mesh.data=3"], 2, "mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 2 are available"),
    (["--run.global_batch_size=30", "--mesh.data=4"], 4, "not divisible by the data-parallel size"),
    (["--data.seq_len=256"], 1, "data.seq_len=256 is longer than model.max_position_embeddings=128"),
    (["--optim.lr=nan"], 1, "optim: lr must be > 0"),
])
def test_cli_reports_bad_config_without_a_traceback(tmp_path, args, devices, message):
    out = tmp_path / "run"
    proc = _cli(f"--run.output_dir={out}", *args, devices=devices)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "prepared").exists()


def test_empty_corpus_is_one_clear_error_and_leaves_no_vocabulary(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    out = tmp_path / "run"
    proc = _cli(f"--run.output_dir={out}", f"--data.corpus={tmp_path / 'empty.txt'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{tmp_path / 'empty.txt'}: the corpus holds no text" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "vocab").exists() and not (out / "checkpoints").exists()
