"""Run every bad input and damaged run directory we know of through the real entry points and write the table
of what a user sees to docs/reliability.md (`python scripts/bad_inputs.py [--out docs/reliability.md]`).

Each case is a command run in a fresh temporary directory (paths there are shown as `<tmp>`); the row records
its exit code and the lines flaxbert printed (its one-line error, or the warning of a case it handles).
Several minutes on 2 CPU cores: each case starts a Python process, and the resume cases train a few steps.
The fault cases that need a patched save path (kill -9, a full disk) or a synthetic loss curve are covered by
the tests named in the second table; tests/test_run_dir.py checks the exit code and the one line of a sample
of the cases below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # benchmarks.common (run as a script from the checkout)
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
WIKI = os.path.join(DATA, "wikitext-2", "wiki.valid.tokens")
SST2 = os.path.join(DATA, "glue", "SST-2")
SQUAD = os.path.join(DATA, "squad", "dev-v1.1.json")
FAST = ["--run.progress=false", "--run.eval_every=0", "--run.log_every=1", "--checkpoint.every=2",
        "--run.global_batch_size=8"]


@dataclasses.dataclass
class Case:
    what: str  # the bad input, as a user would describe it
    args: list[str]  # after `python -m`; `{tmp}` is the case's directory, `{run}` a trained run directory
    setup: Callable[[str], None] = lambda tmp: None  # prepares {tmp} (and may damage {run}, a fresh copy)
    needs_run: bool = False  # the case starts from a copy of a run directory trained 4 steps
    expect: int = 2  # the exit code we want


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _edit_json(path: str, edit: Callable[[dict], None]) -> None:
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    edit(record)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f)


def _first_shard(run: str) -> str:
    with open(os.path.join(run, "prepared", "train", "manifest.json"), encoding="utf-8") as f:
        return os.path.join(run, "prepared", "train", json.load(f)["shards"][0]["name"])


def _truncate_tokens(tmp: str) -> None:
    path = os.path.join(_first_shard(os.path.join(tmp, "run")), "tokens.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _pickle_tokens(tmp: str) -> None:
    import numpy as np

    np.save(os.path.join(_first_shard(os.path.join(tmp, "run")), "tokens.npy"),
            np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _shard_outside(name: str) -> Callable[[str], None]:
    def edit(record: dict) -> None:
        record["shards"][0]["name"] = name

    return lambda tmp: _edit_json(os.path.join(tmp, "run", "prepared", "train", "manifest.json"), edit)


def _corrupt_latest(tmp: str) -> None:
    ckpt = os.path.join(tmp, "run", "checkpoints")
    latest = max((d for d in os.listdir(ckpt) if d.isdigit()), key=int)
    for root, _, files in os.walk(os.path.join(ckpt, latest)):
        for name in files:
            if not name.endswith(".json"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))


def _hf_model(tmp: str, config: dict, tokenizer: Optional[str] = None) -> None:
    from benchmarks.common import minilm_dir

    src = str(minilm_dir())
    os.makedirs(os.path.join(tmp, "model"))
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(tmp, "model", name))
    _edit_json(os.path.join(tmp, "model", "config.json"), lambda c: c.update(config))
    if tokenizer is not None:
        _write(os.path.join(tmp, "model", "tokenizer.json"), tokenizer)


def _small_model_with_minilms_tokenizer(tmp: str) -> None:
    """A random BERT of 1,000 embedding rows beside MiniLM's 30,522-token tokenizer."""
    import transformers

    from benchmarks.common import minilm_dir

    out = os.path.join(tmp, "model")
    config = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    transformers.BertModel(config).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(out)


def _custom_csv(rows: str) -> Callable[[str], None]:
    return lambda tmp: (_write(os.path.join(tmp, "train.csv"), "text,label\n" + rows),
                        _write(os.path.join(tmp, "dev.csv"), "text,label\n" + rows))


PRETRAIN = ["flaxbert.pretrain", "--run.output_dir={tmp}/run", *FAST]
RESUME = ["flaxbert.pretrain", "--run.output_dir={tmp}/run", "--data.corpus={corpus}", "--run.steps=6", *FAST]
FINETUNE = ["flaxbert.finetune", "--output-dir={tmp}/ft", "--max-train-examples=16", "--max-eval-examples=16",
            "--epochs=1", "--no-progress"]

CASES = [
    # configuration
    Case("`--optim.lr=nan`", PRETRAIN + ["--optim.lr=nan"]),
    Case("`--optim.lr=-1`", PRETRAIN + ["--optim.lr=-1"]),
    Case("an unknown key `--optim.learning_rate=1e-3`", PRETRAIN + ["--optim.learning_rate=1e-3"]),
    Case("a value of the wrong type `--run.steps=many`", PRETRAIN + ["--run.steps=many"]),
    Case("a config file that does not exist", PRETRAIN + ["--config={tmp}/nowhere.yaml"]),
    Case("a config file that is not YAML", PRETRAIN + ["--config={tmp}/bad.yaml"],
         lambda tmp: _write(os.path.join(tmp, "bad.yaml"), "model: [unclosed\n")),
    Case("hidden size not divisible by the heads", PRETRAIN + ["--model.hidden_size=100", "--model.num_attention_heads=3"]),
    Case("an output directory under a file", ["flaxbert.pretrain", "--run.output_dir={tmp}/a-file/run", *FAST],
         lambda tmp: _write(os.path.join(tmp, "a-file"), "")),
    # corpora and vocabularies
    Case("an empty corpus", PRETRAIN + ["--data.corpus={tmp}/empty.txt"],
         lambda tmp: _write(os.path.join(tmp, "empty.txt"), "")),
    Case("a corpus that does not exist", PRETRAIN + ["--data.corpus={tmp}/missing.txt"]),
    Case("a binary file as the corpus", PRETRAIN + ["--data.corpus={tmp}/blob.bin"],
         lambda tmp: open(os.path.join(tmp, "blob.bin"), "wb").write(bytes(range(256)) * 64)),
    Case("the real corpus in the directory an empty-corpus run failed in (it used to reuse a 5-token vocab)",
         ["flaxbert.pretrain", "--run.output_dir={tmp}/run", "--data.corpus={corpus}", "--run.steps=2", *FAST],
         lambda tmp: subprocess.run([sys.executable, "-m", *[a.format(tmp=tmp) for a in PRETRAIN],
                                     f"--data.corpus={os.devnull}"], env=_env(), capture_output=True),
         expect=0),
    Case("`flaxbert.vocab` on an empty corpus",
         ["flaxbert.vocab", "--corpus", "{tmp}/empty.txt", "--vocab-size", "100", "--out", "{tmp}/vocab"],
         lambda tmp: _write(os.path.join(tmp, "empty.txt"), "")),
    Case("`flaxbert.data prepare` with a tokenizer directory that does not exist",
         ["flaxbert.data", "prepare", "--corpus", WIKI, "--tokenizer", "{tmp}/nowhere", "--out", "{tmp}/p"]),
    # a run directory that holds other data or another model
    Case("another corpus in a run directory that has trained (checkpoints removed)",
         ["flaxbert.pretrain", "--run.output_dir={tmp}/run", f"--data.corpus={WIKI}", *FAST],
         lambda tmp: shutil.rmtree(os.path.join(tmp, "run", "checkpoints")), needs_run=True),
    Case("another masking rate in a run directory that has trained", RESUME + ["--data.masked_lm_prob=0.25"],
         needs_run=True),
    Case("resume with another model size", RESUME + ["--model.hidden_size=64", "--model.num_attention_heads=2"],
         needs_run=True),
    Case("resume with another optimizer", RESUME + ["--optim.name=lamb"], needs_run=True),
    Case("resume with another `--run.global_batch_size`", RESUME + ["--run.global_batch_size=4"], needs_run=True),
    Case("resume with a truncated shard `tokens.npy`", RESUME, _truncate_tokens, needs_run=True),
    Case("resume with a pickled object array as a shard", RESUME, _pickle_tokens, needs_run=True),
    Case("a manifest whose shard name leaves the directory (`../outside/evil`)", RESUME,
         _shard_outside("../outside/evil"), needs_run=True),
    Case("a manifest whose shard name is absolute (`/etc`)", RESUME, _shard_outside("/etc"), needs_run=True),
    Case("resume with the latest checkpoint truncated", RESUME, _corrupt_latest, needs_run=True, expect=0),
    Case("metrics.jsonl but no checkpoint (killed before the first save)", RESUME,
         lambda tmp: shutil.rmtree(os.path.join(tmp, "run", "checkpoints")), needs_run=True, expect=0),
    Case("a checkpoint directory that is a file", RESUME + ["--checkpoint.directory={tmp}/a-file"],
         lambda tmp: _write(os.path.join(tmp, "a-file"), ""), needs_run=True),
    # Hugging Face checkpoints and fine-tuning
    Case("a config.json with hidden_size 12,000,000", FINETUNE + ["--task=sst2", "--model={tmp}/model",
                                                                 f"--data={SST2}"],
         lambda tmp: _hf_model(tmp, {"hidden_size": 12_000_000})),
    Case("a config.json of an unsupported model_type", FINETUNE + ["--task=sst2", "--model={tmp}/model",
                                                                  f"--data={SST2}"],
         lambda tmp: _hf_model(tmp, {"model_type": "gpt2"})),
    Case("a malformed tokenizer.json", FINETUNE + ["--task=sst2", "--model={tmp}/model", f"--data={SST2}"],
         lambda tmp: _hf_model(tmp, {}, tokenizer="{not json")),
    Case("a tokenizer with more tokens than the model's embedding rows",
         FINETUNE + ["--task=sst2", "--model={tmp}/model", f"--data={SST2}"], _small_model_with_minilms_tokenizer),
    Case("SQuAD windows too short for `doc_stride` (`--max-length=96`, stride 128)",
         FINETUNE + ["--task=squad", "--model={minilm}", f"--data=train={SQUAD},dev={SQUAD}", "--max-length=96"]),
    Case("a model directory that does not exist", FINETUNE + ["--task=sst2", "--model={tmp}/nowhere",
                                                             f"--data={SST2}"]),
    Case("an unknown task", FINETUNE + ["--task=sst3", "--model={minilm}", f"--data={SST2}"]),
    Case("a data directory without the task's files", FINETUNE + ["--task=sst2", "--model={minilm}",
                                                                 "--data={tmp}"]),
    Case("a CSV label outside the label set", FINETUNE + ["--task=text_classification", "--model={minilm}",
                                                         "--data=train={tmp}/train.csv,dev={tmp}/dev2.csv"],
         lambda tmp: (_custom_csv("good film,pos\nbad film,neg\n")(tmp),
                      _write(os.path.join(tmp, "dev2.csv"), "text,label\ngood film,pos\nok film,maybe\n"))),
    Case("a CSV without a label column", FINETUNE + ["--task=text_classification", "--model={minilm}",
                                                    "--data=train={tmp}/train.csv,dev={tmp}/dev.csv"],
         lambda tmp: (_write(os.path.join(tmp, "train.csv"), "text,target\ngood film,pos\n"),
                      _write(os.path.join(tmp, "dev.csv"), "text,target\ngood film,pos\n"))),
    Case("`flaxbert.pipelines` with a model directory that does not exist", ["flaxbert.pipelines", "ner",
                                                                            "{tmp}/nowhere", "some text"]),
]

# faults that need a patched save path or a synthetic loss curve: covered by these tests
TESTED = [
    ("kill -9 during an asynchronous checkpoint save", "the partial step is never taken; resume from the "
     "previous one gives bitwise the losses of an uninterrupted run",
     "test_run_dir.py::test_kill9_during_an_async_save_resumes_bitwise_and_a_full_disk_stops_cleanly"),
    ("a full disk (ENOSPC) during a save", "`checkpoint error: saving the checkpoint of step N in DIR failed "
     "(...); the run stops; the checkpoints kept: [...]`, exit 2; the previous checkpoint survives", "same test"),
    ("the checkpoint directory replaced by a file after the start (a lost mount)", "the same one line, exit 2 "
     "at once (orbax's save threads would otherwise keep the process waiting for its 10-minute timeout)",
     "same test"),
    ("kill -9 at random moments, then resume", "bitwise the same run", "test_train_checkpoint.py"),
    ("SIGTERM", "a checkpoint at the current step, then exit; resume continues", "test_train_checkpoint.py"),
    ("a loss that blows up (1e13) before it goes non-finite", "`run.spike_factor`: the spike run stops or "
     "skips under `nan_policy`; \"last good\" is the newest checkpoint before the first bad step",
     "test_train_spikes.py"),
    ("labels `1`, `\"1\"`, `1.0`, `true` in one JSONL column; `1` and `1.0` in CSV", "one class",
     "test_finetune_readers.py::test_labels_that_are_one_number_in_several_spellings_are_one_class"),
    ("a mixed label column (numbers and words)", "refused with file:line", "test_finetune_readers.py"),
    ("prepared data of another tokenizer", "refused before compiling",
     "test_train_checkpoint.py::test_prepared_data_of_another_tokenizer_is_refused_before_compiling"),
]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _flaxbert_lines(stderr: str) -> list[str]:
    """What flaxbert said: its one-line errors and its warnings (not third-party noise)."""
    keep = [line for line in stderr.splitlines()
            if re.match(r"^flaxbert\.\w+: ", line) or re.search(r"\bWARNING\b", line) and "flaxbert" in line]
    return keep[:3]


def _shown(text: str, tmp: str, corpus: str, minilm: str) -> str:
    text = text.replace(tmp, "<tmp>").replace(corpus, "<corpus>").replace(minilm, "<all-MiniLM-L6-v2>")
    text = text.replace(DATA, "../shared/data").replace(REPO, "<checkout>").replace(tempfile.gettempdir(), "<tmpdir>")
    return re.sub(r"<tmpdir>/flaxbert-\w+-[\d-]+\.log", "<tmpdir>/....log", text)


def _base_run(root: str, corpus: str) -> str:
    run = os.path.join(root, "base", "run")
    proc = subprocess.run([sys.executable, "-m", "flaxbert.pretrain", f"--run.output_dir={run}",
                           f"--data.corpus={corpus}", "--run.steps=4", *FAST], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"the base run failed:\n{proc.stderr[-3000:]}")
    return run


def run_cases(cases: list[Case]) -> list[dict]:
    from benchmarks.common import minilm_dir

    minilm = str(minilm_dir())
    rows = []
    with tempfile.TemporaryDirectory() as root:
        corpus = os.path.join(root, "wiki-slice.tokens")
        with open(WIKI, encoding="utf-8") as f:
            _write(corpus, "".join(f.readlines()[:600]))
        base = _base_run(root, corpus) if any(c.needs_run for c in cases) else None
        for i, case in enumerate(cases):
            tmp = os.path.join(root, f"case{i}")
            os.makedirs(tmp)
            if case.needs_run:
                shutil.copytree(base, os.path.join(tmp, "run"))
            case.setup(tmp)
            args = [a.format(tmp=tmp, corpus=corpus, minilm=minilm) for a in case.args]
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", *args], env=_env(), cwd=REPO, capture_output=True,
                                  text=True, timeout=900)
            lines = _flaxbert_lines(proc.stderr)
            if not lines and proc.returncode != 0:
                lines = ["(no flaxbert line) " + (proc.stderr.strip().splitlines() or [""])[-1]]
            row = {"what": case.what, "command": "python -m " + " ".join(args), "exit": proc.returncode,
                   "expect": case.expect, "lines": lines, "traceback_on_terminal": "Traceback" in proc.stderr,
                   "seconds": round(time.time() - t0, 1)}
            row = json.loads(_shown(json.dumps(row), tmp, corpus, minilm))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict]) -> str:
    out = ["# Bad input and faults: what a user sees", "",
           "Made by `python scripts/bad_inputs.py` (" + time.strftime("%Y-%m-%d") + "), which runs each case "
           "through the real entry point in a fresh directory (`<tmp>`; `<corpus>` is the first 600 lines of "
           "WikiText-2 valid; \"a run directory that has trained\" is a copy of one trained 4 steps on it). Exit "
           "code 2 with one line is the contract for bad input (`flaxbert/cli.py`); the traceback goes to the "
           "file that line names. Cases with exit 0 are damaged states flaxbert handles: the line is its "
           "warning.", "",
           "| bad input | exit | what flaxbert prints |", "|---|---:|---|"]
    for r in rows:
        mark = "" if r["exit"] == r["expect"] and not r["traceback_on_terminal"] else " **(unexpected)**"
        said = "<br>".join(f"`{_cell(line)}`" for line in r["lines"]) or "(nothing)"
        out.append(f"| {_cell(r['what'])} | {r['exit']}{mark} | {said} |")
    out += ["", "## Faults covered by tests", "", "| fault | what happens | test |", "|---|---|---|"]
    out += [f"| {a} | {b} | `{c}` |" for a, b, c in TESTED]
    out += ["", "## Not tried here", "",
            "- A `gs://` checkpoint directory: the same checks run through `etils.epath`, but no bucket is "
            "reachable from this machine.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "reliability.md"))
    ap.add_argument("--only", default="", help="run only the cases whose description contains this")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if args.only.lower() in c.what.lower()]
    rows = run_cases(cases)
    if not args.only:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(markdown(rows))
    bad = [r["what"] for r in rows if r["exit"] != r["expect"] or r["traceback_on_terminal"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} as expected" + (f"; not: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
