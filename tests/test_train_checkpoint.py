"""Checkpoints: fallback past a corrupt or partly written latest checkpoint, and exact resume of
`python -m flaxbert.pretrain` after kill -9 and after SIGTERM (acceptance 4 and 5)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxbert.train.checkpoint import CheckpointError, Checkpointer, CheckpointWarning
from flaxbert.train.writer import latest_by_step, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(offset):
    s = NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), P())
    return {"w": jax.device_put(jnp.arange(256.0) + offset, s), "step": jax.device_put(jnp.int32(offset), s)}


def _target():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


def _saved(tmp_path, steps=(1, 2, 3)):
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep=5)
    for s in steps:
        ck.save(s, _state(s), {"position": s})
    ck.wait()
    return ck


def _data_files(directory):
    """The chunk files that hold the array bytes (orbax/tensorstore `d/` directories)."""
    return [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs if os.path.basename(d) == "d"]


def test_truncated_latest_falls_back_with_a_warning_naming_it(tmp_path):
    ck = _saved(tmp_path)
    victims = _data_files(tmp_path / "checkpoints" / "3" / "state")
    assert victims
    for victim in victims:  # as if the copy of the checkpoint had stopped half-way
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    with pytest.warns(CheckpointWarning) as caught:
        state, data_state, meta = ck.restore_latest(_target())
    assert data_state == {"position": 2} and int(state["step"]) == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(256.0) + 2)
    assert any(str(tmp_path / "checkpoints" / "3") in str(w.message) for w in caught)
    ck.save(3, _state(3), {"position": 3})  # the corrupt step was moved aside: saving it again works
    ck.wait()
    assert ck.all_steps()[-1] == 3


def test_values_that_do_not_match_their_fingerprint_are_rejected(tmp_path):
    ck = _saved(tmp_path)
    meta = tmp_path / "checkpoints" / "3" / "meta" / "metadata"
    record = json.loads(meta.read_text())
    record["fingerprint"][0] ^= 1  # as if one bit of `step`'s bytes had flipped on disk
    meta.write_text(json.dumps(record))
    with pytest.warns(CheckpointWarning, match="fingerprint"):
        _, data_state, _ = ck.restore_latest(_target())
    assert data_state == {"position": 2}


def test_partly_written_checkpoint_is_never_picked_up(tmp_path):
    ck = _saved(tmp_path, steps=(1, 2))
    partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # not even a warning: it is not a checkpoint
        _, data_state, _ = ck.restore_latest(_target())
    assert data_state == {"position": 2}


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    ck = _saved(tmp_path, steps=(1,))
    bad_target = {"w": jax.ShapeDtypeStruct((7,), jnp.float32, sharding=_target()["w"].sharding),
                  "step": _target()["step"]}
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no checkpoint could be restored"):
        ck.restore_latest(bad_target)


# ----- the CLI: kill -9 and SIGTERM ---------------------------------------------------------------------

STEPS = 40
COMPARED = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "grad_norm", "lr")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from flaxbert import data, vocab
    from flaxbert.train.pretraining import packaged_corpus

    root = tmp_path_factory.mktemp("prepared")
    vocab.train_wordpiece(packaged_corpus(), 512, root / "vocab", corpus_format="lines")
    data.prepare(packaged_corpus(), str(root / "vocab"), root / "train", corpus_format="lines", max_seq_length=32,
                 max_predictions_per_seq=5, model_vocab_size=512, progress=False)
    return str(root / "train")


def _command(out_dir, prepared):
    return [sys.executable, "-m", "flaxbert.pretrain", f"--run.output_dir={out_dir}", f"--data.prepared_dir={prepared}",
            "--model.hidden_size=32", "--model.num_attention_heads=2", "--model.intermediate_size=64",
            "--model.vocab_size=512", "--model.max_position_embeddings=32", "--data.seq_len=32",
            "--run.global_batch_size=8", f"--run.steps={STEPS}", "--run.log_every=1", "--run.eval_every=0",
            "--checkpoint.every=8", "--run.progress=false", "--data.masking=dynamic", "--data.nsp=true"]


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _logged_steps(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    return max(latest_by_step(read_jsonl(path)), default=0) if os.path.exists(path) else 0


def _run_until(cmd, out_dir, step, sig):
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _logged_steps(out_dir) < step:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited early with {proc.returncode}: {out[-1000:]}\n{err[-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_kill9_and_sigterm_resume_is_bitwise_identical(tmp_path, prepared):
    ref_dir, dir_ = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    done = subprocess.run(_command(ref_dir, prepared), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = latest_by_step(read_jsonl(os.path.join(ref_dir, "metrics.jsonl")))
    assert sorted(reference) == list(range(1, STEPS + 1))

    kill_at = random.Random().randint(10, 20)  # after the checkpoint at step 8
    code, _, err = _run_until(_command(dir_, prepared), dir_, kill_at, signal.SIGKILL)
    assert code == -signal.SIGKILL, err[-2000:]
    killed_at = _logged_steps(dir_)
    assert killed_at < STEPS

    term_at = killed_at + 4
    code, out, err = _run_until(_command(dir_, prepared), dir_, term_at, signal.SIGTERM)
    assert code == 0, err[-3000:]
    saved = int(out.split("saved a checkpoint at step ")[1].split()[0])
    assert saved >= term_at and saved == _logged_steps(dir_), (saved, out)
    assert os.path.isdir(os.path.join(dir_, "checkpoints", str(saved)))

    done = subprocess.run(_command(dir_, prepared), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = latest_by_step(read_jsonl(os.path.join(dir_, "metrics.jsonl")))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in COMPARED:
            assert resumed[step][key] == reference[step][key], (step, key, kill_at, saved)


def test_init_from_hf_checkpoint_continues_from_its_weights(tmp_path, prepared):
    """`--init_from` takes the model shape and weights from an HF BertForPreTraining directory."""
    import orbax.checkpoint as ocp
    import torch
    import transformers

    hf_config = transformers.BertConfig(vocab_size=512, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForPreTraining(hf_config).save_pretrained(tmp_path / "hf")
    word = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").bert.embeddings.word_embeddings.weight
    out = tmp_path / "run"
    cmd = [c for c in _command(str(out), prepared) if not c.startswith("--model.")]
    cmd = [c if not c.startswith("--run.steps=") else "--run.steps=1" for c in cmd]
    proc = subprocess.run(cmd + [f"--init_from={tmp_path / 'hf'}", "--optim.lr=1e-9", "--optim.warmup_steps=0"],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = (out / "config.yaml").read_text()
    assert "hidden_size: 48" in resolved and "num_hidden_layers: 1" in resolved
    state = ocp.StandardCheckpointer().restore(out / "checkpoints" / "1" / "state")
    ours = np.asarray(state["params"]["bert"]["embeddings"]["word_embeddings"])
    np.testing.assert_allclose(ours, word.detach().numpy(), atol=1e-6)


@pytest.mark.slow  # ~1.5 min here; the step itself is checked across processes in test_train_step.py
def test_two_process_cli_run_checkpoints_and_resumes(tmp_path, prepared):
    """Two real processes (2 CPU devices each, gloo): one metrics writer, a data-iterator state per process
    in each checkpoint, and a rerun with more steps resumes both processes from it."""
    import socket

    out = tmp_path / "run"

    def run_pair(steps):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [c if not c.startswith("--run.steps=") else f"--run.steps={steps}" for c in _command(str(out), prepared)]
        cmd = [c if not c.startswith("--checkpoint.every=") else "--checkpoint.every=2" for c in cmd]
        env = {**_env(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=2"}
        procs = [subprocess.Popen(cmd + [f"--run.coordinator_address=127.0.0.1:{port}", "--run.num_processes=2",
                                         f"--run.process_id={i}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (o, e) in zip(procs, outs):
            assert p.returncode == 0, e[-3000:]
        return [o for o, _ in outs]

    first = run_pair(4)
    assert "finished at step 4" in first[0] and "finished" not in first[1]  # process 0 reports
    assert sorted(os.listdir(out / "checkpoints_data_state" / "4")) == ["process_0.json", "process_1.json"]
    states = [json.loads((out / "checkpoints_data_state" / "4" / f"process_{i}.json").read_text()) for i in range(2)]
    assert states[0]["settings"]["process_index"] == 0 and states[1]["settings"]["process_index"] == 1
    run_pair(6)
    records = [r for r in read_jsonl(str(out / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # one writer, and the rerun started at step 5


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, prepared):
    """A learning rate of 1e30 blows the weights up after the first update: the run stops at step 2 with
    exit status 1 and names step 1's checkpoint, which stays the newest."""
    out = tmp_path / "run"
    cmd = [c for c in _command(str(out), prepared) if not c.startswith(("--run.steps=", "--checkpoint.every="))]
    proc = subprocess.run(cmd + ["--run.steps=6", "--checkpoint.every=1", "--optim.lr=1e30",
                                 "--optim.warmup_steps=0", "--optim.clip_norm=0"],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite loss or gradient at step 2" in proc.stdout
    assert "last good checkpoint is step 1" in proc.stdout
    assert sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit()) == [1]


def test_vocab_mismatch_is_a_config_error_before_compiling(tmp_path, prepared):
    out = tmp_path / "run"
    cmd = [c if not c.startswith("--model.vocab_size=") else "--model.vocab_size=300" for c in
           _command(str(out), prepared)]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the vocabulary has 512 tokens but model.vocab_size=300" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "checkpoints").exists()


def test_device_prefetch_does_not_change_the_run(tmp_path, prepared):
    """The loop with batches sent ahead (run.prefetch=3, and 1) logs bitwise the losses of the loop that sends
    each batch when it uses it (run.prefetch=0), and saves the same data position."""
    runs = {}
    for depth in (0, 1, 3):
        out = str(tmp_path / f"prefetch{depth}")
        cmd = [c.replace(f"--run.steps={STEPS}", "--run.steps=12") for c in _command(out, prepared)]
        done = subprocess.run(cmd + [f"--run.prefetch={depth}", "--data.packed=true"], env=_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[depth] = (latest_by_step(read_jsonl(os.path.join(out, "metrics.jsonl"))),
                       json.loads((tmp_path / f"prefetch{depth}" / "checkpoints_data_state" / "8" /
                                   "process_0.json").read_text()))
    reference, state = runs[0]
    assert sorted(reference) == list(range(1, 13)) and state["next_batch"] == 8
    for depth in (1, 3):
        metrics, saved = runs[depth]
        assert saved == state
        for step in range(1, 13):
            for key in COMPARED:
                assert metrics[step][key] == reference[step][key], (depth, step, key)


def test_prepared_data_of_another_tokenizer_is_refused_before_compiling(tmp_path, prepared, minilm_dir):
    out = tmp_path / "run"
    cmd = _command(str(out), prepared) + [f"--data.vocab={minilm_dir}"]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{prepared}: prepared with tokenizer" in proc.stderr and "not the model's tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "checkpoints").exists()


def test_resume_with_other_data_settings_is_one_clear_error_and_keeps_the_checkpoint(tmp_path, prepared):
    out = tmp_path / "run"
    first = [c.replace(f"--run.steps={STEPS}", "--run.steps=8") for c in _command(str(out), prepared)]
    done = subprocess.run(first, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    again = [c.replace("--run.global_batch_size=8", "--run.global_batch_size=4") for c in _command(str(out), prepared)]
    proc = subprocess.run(again, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data error: the saved loader state was made with other data settings; global_batch_size: saved 8, " \
           "now 4" in proc.stderr
    assert "Traceback" not in proc.stderr and (out / "checkpoints" / "8").is_dir()
