"""A sequence-length schedule in one run (`data.short_seq_len`, `data.short_share`): the first share of the steps
(or of a budget's time) trains on short rows, the rest on full rows; a resume before, at or after the switch
continues exactly as the uninterrupted run; bad settings are refused naming the key."""

import json
import os
import shutil

import pytest

from flaxbert import run_config as rc
from flaxbert.train import loop, phases, pretraining
from flaxbert.train.writer import latest_by_step, read_jsonl

STEPS = 24


def _overrides(out_dir, *extra):
    # the packaged corpus and its shipped 2,048-token vocabulary, prepared in the run directory at 16 and 32 tokens
    return [f"--run.output_dir={out_dir}", "--model.hidden_size=32", "--model.num_attention_heads=2",
            "--model.intermediate_size=64", "--model.max_position_embeddings=32", "--data.seq_len=32",
            "--data.max_predictions_per_seq=6", "--data.short_seq_len=16", "--data.short_share=0.5",
            "--run.global_batch_size=8", f"--run.steps={STEPS}", "--run.log_every=1", "--run.eval_every=0",
            "--optim.warmup_steps=4", "--checkpoint.every=4", "--checkpoint.keep=10", "--checkpoint.async_save=false", "--run.progress=false",
            *extra]


def _train(out_dir, *extra):
    cfg, task = pretraining.build_task(rc.load("", _overrides(out_dir, *extra)))
    return loop.train(cfg, task), latest_by_step(read_jsonl(os.path.join(out_dir, "metrics.jsonl")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("phases") / "reference"
    result, records = _train(str(out))
    assert result.reason == "finished" and result.step == STEPS
    return out, records


def test_short_rows_train_the_first_share_of_the_steps(reference):
    out, records = reference
    assert sorted(records) == list(range(1, STEPS + 1))
    assert [records[s]["seq_len"] for s in range(1, STEPS + 1)] == [16.0] * (STEPS // 2) + [32.0] * (STEPS // 2)
    short = json.load(open(out / "prepared" / "train-short" / "manifest.json"))
    full = json.load(open(out / "prepared" / "train" / "manifest.json"))
    assert (short["max_seq_length"], short["max_predictions_per_seq"]) == (16, 3)  # 6 predictions scaled to 16
    assert (full["max_seq_length"], full["max_predictions_per_seq"]) == (32, 6)
    # one learning-rate schedule over both phases: 4 warmup steps, then a decay that goes on through the switch
    # (two runs, as BERT's phases, would warm up again)
    lrs = [records[s]["lr"] for s in range(1, STEPS + 1)]
    peak = lrs.index(max(lrs))
    assert peak <= 4 and all(b < a for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    states = {s: json.load(open(out / "checkpoints_data_state" / str(s) / "process_0.json")) for s in (8, 12, 16)}
    assert [states[s]["phase"] for s in (8, 12, 16)] == [0, 0, 1]  # step 12 is phase 1's last


@pytest.mark.parametrize("resume_at", [8, 12, 16])  # in phase 1, at its last step, in phase 2
def test_a_resume_before_at_or_after_the_switch_continues_exactly(reference, tmp_path, resume_at):
    ref_dir, ref = reference
    out = tmp_path / "resumed"
    shutil.copytree(ref_dir, out)
    for d in ("checkpoints", "checkpoints_data_state"):
        for step in os.listdir(out / d):
            if step.isdigit() and int(step) > resume_at:
                shutil.rmtree(out / d / step)
    result, resumed = _train(str(out))
    assert result.step == STEPS
    for step in range(resume_at + 1, STEPS + 1):
        for key in ("loss", "mlm_accuracy", "grad_norm", "lr", "seq_len"):
            assert resumed[step][key] == ref[step][key], (resume_at, step, key)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def seconds(self):
        return self.now


def test_a_budget_run_switches_at_its_share_of_the_schedule_time():
    """In a budget run the switch comes when the share of the schedule's time (which starts after the first step
    has compiled and run) reaches data.short_share; a run of steps switches at that share of run.steps."""
    cfg = rc.load("", _overrides("/nowhere", "--run.budget_minutes=1", "--run.steps=100000",
                                 "--optim.warmup_fraction=0.2"))
    job = loop.Job(init_params=None, logical_axes=None, loss_fn=None, train_batches=iter(()), seq_len=32,
                   short_rows=phases.ShortRows(iter(()), 16, 0.0, share=0.5))
    run = loop._Run.__new__(loop._Run)
    run.cfg, run.task, run.budget_s, run.step, run.clock = cfg, job, 60.0, 0, _Clock()
    run.phased, run.lr_origin_s = phases.PhasedBatches(iter(()), iter(())), None
    run.clock.now = 50.0
    assert not run.phase_due()  # the schedule has not started: no step has run yet
    run.lr_origin_s = 20.0  # the first step compiled and ran in 20 s: 40 s of schedule remain
    for now, due in ((20.0, False), (39.9, False), (40.0, True), (59.0, True)):
        run.clock.now = now
        assert run.phase_due() is due, now
    run.phased.advance()
    assert not run.phase_due()  # already in phase 2
    steps = rc.load("", _overrides("/nowhere"))
    run.cfg, run.budget_s, run.phased = steps, 0.0, phases.PhasedBatches(iter(()), iter(()))
    due = []
    for step in (11, 12, 13):
        run.step = step
        due.append(run.phase_due())
    assert due == [False, True, True]  # after step 12 of 24, the next is at 32 tokens


@pytest.mark.parametrize("extra, message", [
    (["--data.short_seq_len=32"], "must be between 0 and data.seq_len=32"),
    (["--data.short_share=1.0"], r"short_share=1.0 must be in \(0, 1\)"),
    (["--data.short_share=nan"], "short_share=nan must be in"),
    (["--data.short_seq_len=0"], "data.short_seq_len=0 turns off"),
    (["--data.prepared_dir=/somewhere"], "pass data.short_prepared_dir"),
    (["--data.short_prepared_dir=/somewhere"], "without data.prepared_dir"),
])
def test_bad_schedules_are_refused_naming_the_setting(tmp_path, extra, message):
    with pytest.raises(rc.ConfigError, match=message):
        rc.load("", _overrides(tmp_path, *extra))


def test_short_rows_of_another_tokenizer_are_refused(tmp_path, reference):
    out, _ = reference
    from flaxbert import data, vocab

    vocab.train_wordpiece(pretraining.packaged_corpus(), 300, tmp_path / "vocab", corpus_format="lines")
    data.prepare(pretraining.packaged_corpus(), str(tmp_path / "vocab"), tmp_path / "short", corpus_format="lines",
                 max_seq_length=16, max_predictions_per_seq=3, nsp=False, progress=False)
    args = [f"--data.prepared_dir={out / 'prepared' / 'train'}", f"--data.short_prepared_dir={tmp_path / 'short'}"]
    with pytest.raises(rc.ConfigError, match="prepared differently: tokenizer_sha256"):
        pretraining.build_task(rc.load("", _overrides(tmp_path / "run", *args)))
