"""Issue 15: a run directory that never trains on stale data (fingerprints, rebuild or refuse, --run.overwrite,
no repeated metrics), one clear line and exit code 2 for bad input at every entry point, and faults in the
checkpoint save path (kill -9 during an async save, a full disk)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from flaxbert.train.writer import latest_by_step, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
WIKI = os.path.join(SHARED, "wikitext-2", "wiki.valid.tokens")
FAST = ["--run.progress=false", "--run.eval_every=0", "--run.log_every=1", "--checkpoint.every=2",
        "--run.global_batch_size=8"]


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(args, module="flaxbert.pretrain", timeout=300):
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _one_line(proc, prog, *needles):
    """Exit code 2, exactly one line from flaxbert on stderr naming the problem, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prog + ":")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Another corpus: the first 600 lines of WikiText-2 valid."""
    path = tmp_path_factory.mktemp("corpus") / "wiki-slice.tokens"
    with open(WIKI, encoding="utf-8") as f:
        path.write_text("".join(f.readlines()[:600]), encoding="utf-8")
    return str(path)


def test_the_run_directory_rebuilds_refuses_or_overwrites_by_its_fingerprint(tmp_path, small_corpus):
    out = str(tmp_path / "run")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # 1. a failed first run leaves nothing a later run would take as valid (it used to leave a 5-token vocab)
    line = _one_line(_run([f"--run.output_dir={out}", f"--data.corpus={empty}", *FAST]), "flaxbert.pretrain",
                     f"{empty}: the corpus holds no text")
    assert "[traceback: " in line
    assert not os.path.exists(os.path.join(out, "vocab")) and not os.path.exists(os.path.join(out, "prepared"))
    assert not os.path.exists(os.path.join(out, "fingerprint.json"))
    # 2. the real corpus in the same directory: a fresh vocabulary and data, and learning signal
    done = _run([f"--run.output_dir={out}", f"--data.corpus={small_corpus}", "--run.steps=4", *FAST])
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.load(open(os.path.join(out, "fingerprint.json")))
    assert [c["path"] for c in record["data"]["corpus"]] == [small_corpus]
    assert record["state"]["model"]["hidden_size"] == 128
    manifest = json.load(open(os.path.join(out, "prepared", "train", "manifest.json")))
    assert manifest["vocab_size"] > 1000 and manifest["counts"]["predictions"] > 0
    # 3. a changed corpus after training (checkpoints removed, metrics kept) is refused, not silently ignored
    shutil.rmtree(os.path.join(out, "checkpoints"))
    _one_line(_run([f"--run.output_dir={out}", f"--data.corpus={WIKI}", *FAST]), "flaxbert.pretrain",
              f"corpus {small_corpus} -> {WIKI}", "--run.overwrite=true")
    # 4. a changed data setting likewise, and another model shape against the checkpoints
    _one_line(_run([f"--run.output_dir={out}", f"--data.corpus={small_corpus}", "--data.masked_lm_prob=0.25",
                    *FAST]), "flaxbert.pretrain", "masked_lm_prob 0.15 -> 0.25")
    again = _run([f"--run.output_dir={out}", f"--data.corpus={small_corpus}", "--run.steps=4", *FAST])
    assert again.returncode == 0, again.stderr[-3000:]  # same settings: the data is reused, training resumes
    _one_line(_run([f"--run.output_dir={out}", f"--data.corpus={small_corpus}", "--model.hidden_size=64",
                    "--model.num_attention_heads=2", *FAST]), "flaxbert.pretrain", "model.hidden_size 128 -> 64")
    # 5. --run.overwrite starts again on the new corpus
    fresh = _run([f"--run.output_dir={out}", f"--data.corpus={WIKI}", "--run.overwrite=true", "--run.steps=2", *FAST])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    record = json.load(open(os.path.join(out, "fingerprint.json")))
    assert [c["path"] for c in record["data"]["corpus"]] == [WIKI]
    assert sorted(latest_by_step(read_jsonl(os.path.join(out, "metrics.jsonl")))) == [1, 2]
    # 6. metrics but no checkpoint (killed before the first save): a notice, and no step logged twice
    shutil.rmtree(os.path.join(out, "checkpoints"))
    rerun = _run([f"--run.output_dir={out}", f"--data.corpus={WIKI}", "--run.steps=2", *FAST])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "moved to metrics.dropped.jsonl (no checkpoint to resume from: starting at step 0)" in rerun.stderr
    steps = [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "train"]
    assert steps == [1, 2]
    assert len(read_jsonl(os.path.join(out, "metrics.dropped.jsonl"))) == 2


def test_the_prepared_data_is_reused_when_the_corpus_is_unchanged(tmp_path, small_corpus):
    from flaxbert.train import rundir

    identity = rundir.file_identity(small_corpus)
    copy = tmp_path / "copy.tokens"
    shutil.copy(small_corpus, copy)  # a copy: another path and mtime, the same data
    assert rundir.data_differences({"corpus": [identity], "format": None, "vocab": {}, "settings": {}},
                                   {"corpus": [rundir.file_identity(str(copy))], "format": None, "vocab": {},
                                    "settings": {}}) == []
    copy.write_text(copy.read_text() + "one more line\n")
    changed = rundir.file_identity(str(copy), identity)
    assert changed["sha256"] != identity["sha256"]


@pytest.mark.parametrize("args,module,needles", [
    (["--optim.lr=nan"], "flaxbert.pretrain", ["config error", "lr must be > 0"]),
    (["--run.output_dir={tmp}/a-file/run"], "flaxbert.pretrain", ["file error", "Not a directory"]),
    (["--corpus", "{tmp}/empty.txt", "--vocab-size", "100", "--out", "{tmp}/vocab"], "flaxbert.vocab",
     ["the corpus holds no text"]),
    (["prepare", "--corpus", "{tmp}/empty.txt", "--tokenizer", "{tmp}/nowhere", "--out", "{tmp}/p"],
     "flaxbert.data", ["{tmp}/nowhere"]),
    (["ner", "{tmp}/nowhere", "some text"], "flaxbert.pipelines", ["{tmp}/nowhere"]),
    (["--task=sst2", "--model={tmp}/badtok", "--data=" + os.path.join(SHARED, "glue", "SST-2")], "flaxbert.finetune",
     ["tokenizer.json"]),
])
def test_every_entry_point_gives_one_line_and_exit_code_2(tmp_path, args, module, needles):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "badtok").mkdir()
    (tmp_path / "badtok" / "tokenizer.json").write_text("{not json")
    (tmp_path / "badtok" / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 100}))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    line = _one_line(_run(args, module), module, *[n.replace("{tmp}", str(tmp_path)) for n in needles])
    log = line.split("[traceback: ")[1].rstrip("]")
    assert "Traceback" in open(log).read()  # the details go to the log file, not the terminal


@pytest.mark.slow  # scripts/slow_tests.sh (CI time); kill -9 and SIGTERM resumes stay: test_train_checkpoint.py
def test_kill9_during_an_async_save_resumes_bitwise_and_a_full_disk_stops_cleanly(tmp_path):
    script = os.path.join(REPO, "tests", "fault_save_script.py")
    common = ["--run.steps=8", *FAST]
    ref = str(tmp_path / "reference")
    done = _run([f"--run.output_dir={ref}", *common])
    assert done.returncode == 0, done.stderr[-3000:]
    reference = latest_by_step(read_jsonl(os.path.join(ref, "metrics.jsonl")))

    killed = str(tmp_path / "killed")  # SIGKILL after step 4's files are written, before its commit
    proc = _run([script, "kill", "4", f"--run.output_dir={killed}", *common], module=None)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(n for n in os.listdir(os.path.join(killed, "checkpoints")) if n.isdigit()) == ["2"]
    resumed = _run([f"--run.output_dir={killed}", *common])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stderr
    after = read_jsonl(os.path.join(killed, "metrics.jsonl"))
    assert [r["step"] for r in after if r["split"] == "train"] == list(range(1, 9))
    for r in after:
        if r["split"] == "train":
            assert {k: r[k] for k in ("loss", "grad_norm")} == {k: reference[r["step"]][k] for k in ("loss", "grad_norm")}

    full = str(tmp_path / "full")  # ENOSPC at step 4's commit
    proc = _run([script, "enospc", "4", f"--run.output_dir={full}", *common], module=None)
    _one_line(proc, "flaxbert.pretrain", "saving the checkpoint of step 4", "No space left on device",
              "the checkpoints kept: [2]")
    resumed = _run([f"--run.output_dir={full}", *common])
    assert resumed.returncode == 0 and "resumed from step 2" in resumed.stderr, resumed.stderr[-3000:]

    # a save that fails before its directory exists: orbax's save threads would keep the process alive
    gone = str(tmp_path / "gone")
    proc = _run([script, "gone", "0", f"--run.output_dir={gone}", *common], module=None)  # it used to hang
    _one_line(proc, "flaxbert.pretrain", "saving the checkpoint of step 2", "Not a directory")


def test_a_checkpoint_directory_that_is_a_file_is_refused_before_training(tmp_path):
    from flaxbert.errors import CheckpointError
    from flaxbert.train.checkpoint import Checkpointer

    for name in ("ckpt", "ckpt_data_state"):
        (tmp_path / name).write_text("not a directory")
        with pytest.raises(CheckpointError, match=f"{name} exists but is a file"):
            Checkpointer(str(tmp_path / "ckpt"))
        (tmp_path / name).unlink()
    Checkpointer(str(tmp_path / "ckpt")).close()
    assert (tmp_path / "ckpt").is_dir()


def test_a_data_refusal_on_process_0_stops_every_process(tmp_path):
    """Process 0 prepares the data; when it fails, the others stop with a line that points to it, instead of
    waiting forever for data that will never come (two real processes, gloo)."""
    import socket

    (tmp_path / "empty.txt").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "flaxbert.pretrain", f"--run.output_dir={tmp_path / 'run'}",
           f"--data.corpus={tmp_path / 'empty.txt'}", *FAST, f"--run.coordinator_address=127.0.0.1:{port}",
           "--run.num_processes=2"]
    env = {**_env(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(cmd + [f"--run.process_id={i}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    results = [subprocess.CompletedProcess(cmd, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
    _one_line(results[0], "flaxbert.pretrain", "the corpus holds no text")
    _one_line(results[1], "flaxbert.pretrain", "process 0 could not prepare the data")


def test_state_fingerprint_names_a_tied_decoder_change_and_reads_older_records():
    from flaxbert import BertConfig
    from flaxbert.train import rundir

    manifest = {"vocab_size": 64, "counts": {"instances": 3}}
    tied = rundir.state_fingerprint(BertConfig.tiny(vocab_size=64), "adamw", manifest)
    untied = rundir.state_fingerprint(BertConfig.tiny(vocab_size=64, tie_word_embeddings=False), "adamw", manifest)
    assert rundir.state_differences(tied, untied) == ["model.tie_word_embeddings True -> False"]
    older = {**tied, "model": {k: v for k, v in tied["model"].items()
                               if k not in ("model_type", "embedding_size", "tie_word_embeddings")}}
    assert rundir.state_differences(older, tied) == []  # a record from before these keys: not a difference
