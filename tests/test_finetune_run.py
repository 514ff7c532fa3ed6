"""End to end on small slices of the real data with a tiny BERT (MiniLM's vocabulary, random weights):
STS-B regression, MRPC pairs, the emotion set, CoNLL NER, SQuAD; outputs, losses and bad models."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxbert
from flaxbert import hf, scores
from flaxbert.finetune import __main__ as cli
from flaxbert.infer import batching
from flaxbert.finetune.task_data import FeatureSettings, load_task_data, make_features
from flaxbert.finetune.run import evaluate_model, finetune, load_config, load_model, make_loss_fn
from flaxbert.finetune.tasks import get_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")


def make_tiny_model(out_dir: Path, minilm_dir: Path, head=None, num_labels=2) -> Path:
    """A 1-layer, 64-wide BERT with MiniLM's tokenizer, saved as a HF directory."""
    from flaxbert.vocab import load_tokenizer

    tok = load_tokenizer(minilm_dir)
    cfg = flaxbert.BertConfig.tiny(vocab_size=tok.vocab_size, num_hidden_layers=1, hidden_size=64,
                                   num_attention_heads=2, intermediate_size=128, max_position_embeddings=128)
    params = flaxbert.init(cfg, jax.random.key(0), head=head, num_labels=num_labels)
    hf.save_pretrained(hf.PretrainedModel(cfg, params, tok, head), str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), minilm_dir)


def quick_config(tmp_path, task, model, data, optim=None, **task_kw):
    tree = {"task": {"name": task, "model": str(model), "data": str(data), "epochs": 1, "max_length": 32,
                     "bucket_min": 32, "max_train_examples": 64, "max_eval_examples": 48, "eval_batch_size": 16,
                     **task_kw},
            "run": {"output_dir": str(tmp_path / "out"), "global_batch_size": 16, "log_every": 2, "progress": False},
            "optim": {"lr": 1e-3, **(optim or {})}}
    return load_config(tree=tree)


@needs_data
def test_stsb_regression_end_to_end(tmp_path, tiny):
    result = finetune(quick_config(tmp_path, "stsb", tiny, DATA / "glue"))
    out = tmp_path / "out"
    preds = [json.loads(line)["score"] for line in (out / "dev_predictions.jsonl").read_text().splitlines()]
    gold = [ex.label for ex in load_task_data(get_task("stsb"), str(DATA / "glue"), with_train=False,
                                              max_eval=48).evals["dev"]]
    # the reported metrics are the correlations of the written predictions with the gold scores
    import scipy.stats
    assert result.metrics["dev"]["pearson"] == pytest.approx(scipy.stats.pearsonr(preds, gold)[0], abs=1e-5)
    assert result.metrics["dev"]["spearman"] == pytest.approx(scipy.stats.spearmanr(preds, gold)[0], abs=1e-5)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["main_metric"] == "pearson" and saved["train"]["real_tokens_per_sec"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "train" and np.isfinite(r["mse_loss"]) for r in records)
    # the loop's one writer also holds each evaluation, once per evaluated step, with the best step's scores
    evals = [r for r in records if r["split"] == "eval_dev"]
    assert len({r["step"] for r in evals}) == len(evals) >= 1
    best = next(r for r in evals if r["step"] == saved["best_step"])
    assert best["pearson"] == pytest.approx(result.metrics["dev"]["pearson"], abs=1e-6)
    assert best["real_tokens_per_sec"] > 0
    reloaded = hf.load_pretrained(str(out / "best_model"), head="auto")
    assert reloaded.head == "sequence_classification" and reloaded.num_labels == 1
    # the saved best model, evaluated on its own, scores what the run reported for its best step
    again = evaluate_model(quick_config(tmp_path / "again", "stsb", out / "best_model", DATA / "glue"))
    assert again["dev"] == pytest.approx(result.metrics["dev"], abs=1e-6)


@needs_data
def test_mrpc_pairs_and_confusion_matrix(tmp_path, tiny):
    result = finetune(quick_config(tmp_path, "mrpc", tiny, DATA / "glue"))
    out = tmp_path / "out"
    assert (out / "dev_confusion.png").read_bytes()[:4] == b"\x89PNG"
    preds = [json.loads(line) for line in (out / "dev_predictions.jsonl").read_text().splitlines()]
    dev = load_task_data(get_task("mrpc"), str(DATA / "glue"), with_train=False, max_eval=48).evals["dev"]
    y_true = [int(ex.label) for ex in dev]
    y_pred = [int(p["label"]) for p in preds]
    import sklearn.metrics
    assert result.metrics["dev"]["f1"] == pytest.approx(sklearn.metrics.f1_score(y_true, y_pred))
    assert result.metrics["dev"]["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(y_true, y_pred))


@needs_data
def test_emotion_custom_task_via_cli(tmp_path, tiny, capsys):
    rc = cli.main(["--task", "emotion", "--model", str(tiny), "--data", str(DATA / "emotion"),
                   "--output-dir", str(tmp_path / "out"), "--epochs", "1", "--max-length", "32",
                   "--max-train-examples", "64", "--max-eval-examples", "48", "--no-progress",
                   "--task.bucket_min=32", "--run.global_batch_size=16", "--task.save_model=false"])
    assert rc == 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["labels"] == ["anger", "fear", "joy", "love", "sadness", "surprise"]
    assert set(saved["eval"]["test"]) == {"accuracy", "macro_f1"}
    assert (tmp_path / "out" / "test_confusion.png").is_file()


@needs_data
def test_ner_end_to_end_writes_entity_report(tmp_path, tiny):
    result = finetune(quick_config(tmp_path, "conll2003", tiny, DATA / "conll2003", max_length=64, bucket_min=64))
    out = tmp_path / "out"
    preds = [json.loads(line) for line in (out / "valid_predictions.jsonl").read_text().splitlines()]
    gold = load_task_data(get_task("conll2003"), str(DATA / "conll2003"), with_train=False, max_eval=48).evals["valid"]
    assert [p["words"] for p in preds] == [ex.words for ex in gold]
    ref = scores.entity_report([ex.tags for ex in gold], [p["tags"] for p in preds])["micro avg"]
    assert result.metrics["valid"]["f1"] == pytest.approx(ref.f1)
    assert "micro avg" in (out / "valid_entities.txt").read_text()
    assert "test" in result.metrics


def test_ner_loss_is_mean_over_labelled_tokens_only(minilm_dir):
    """The NER loss is sum over scored tokens / their count; padding, special tokens, later sub-tokens
    and filler rows do not dilute it (HF's Flax NER example divides by all positions)."""
    cfg = flaxbert.BertConfig.tiny(vocab_size=200, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)
    task = get_task("ner").with_labels(["O", "B-X", "I-X"])
    params = flaxbert.init(cfg, jax.random.key(1), head="token_classification", num_labels=3)
    feats = [{"input_ids": np.array([2, 5, 6, 7, 3], np.int32), "token_type_ids": np.zeros(5, np.int32),
              "token_labels": np.array([-100, 1, -100, 0, -100], np.int32)},
             {"input_ids": np.array([2, 9, 3], np.int32), "token_type_ids": np.zeros(3, np.int32),
              "token_labels": np.array([-100, 2, -100], np.int32)}]
    (batch,) = batching.make_batches(feats, 4, (8,))
    out = make_loss_fn(task, cfg)(params, {k: v for k, v in batch.items() if k != "index"}, None)
    total, weight = out.terms["ce"]
    logits = flaxbert.apply_head(params, batch, cfg, head="token_classification").logits
    logp = jax.nn.log_softmax(logits)
    expected = -(logp[0, 1, 1] + logp[0, 3, 0] + logp[1, 1, 2]) / 3
    assert float(weight) == 3.0
    assert float(total / weight) == pytest.approx(float(expected), rel=1e-5)


@needs_data
def test_squad_slice_end_to_end(tmp_path, tiny):
    squad = DATA / "squad" / "dev-v1.1.json"
    cfg = quick_config(tmp_path, "squad", tiny, f"train={squad},dev={squad}", max_length=64, bucket_min=64,
                       doc_stride=24, max_query_length=16, max_train_examples=32, max_eval_examples=24)
    result = finetune(cfg)
    preds = {json.loads(line)["id"]: json.loads(line) for line in
             (tmp_path / "out" / "dev_predictions.jsonl").read_text().splitlines()}
    examples = load_task_data(get_task("squad"), f"dev={squad}", with_train=False, max_eval=24).evals["dev"]
    for ex in examples:
        p = preds[ex.qid]
        assert ex.context[p["start"]:p["end"]] == p["text"]
    gold = [scores.SquadExample(ex.qid, tuple(a for a, _ in ex.answers)) for ex in examples]
    ref = scores.squad_evaluate(gold, {q: p["text"] for q, p in preds.items()})
    assert result.metrics["dev"]["f1"] == pytest.approx(ref["f1"])


def test_head_with_other_label_count_is_reinitialised_or_refused(tmp_path, minilm_dir, caplog):
    three_way = make_tiny_model(tmp_path / "m3", minilm_dir, head="sequence_classification", num_labels=3)
    binary = get_task("sst2")
    model = load_model(binary, load_config(tree={"task": {"model": str(three_way)}}).task)
    assert model.num_labels == 2
    assert "head is newly initialised" in caplog.text
    caplog.clear()
    same = load_model(get_task("mnli"), load_config(tree={"task": {"model": str(three_way)}}).task)
    assert same.num_labels == 3 and "newly initialised" not in caplog.text
    from flaxbert.finetune.readers import DataError
    with pytest.raises(DataError, match="m3"):
        load_model(binary, load_config(tree={"task": {"model": str(three_way), "on_head_mismatch": "error"}}).task)


def test_cli_reports_bad_data_with_file_and_line(tmp_path, tiny, capsys):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    (tmp_path / "dev.csv").write_text("text,label\nfine,pos\nodd,maybe\n")
    rc = cli.main(["--task", "text_classification", "--model", str(tiny), "--data", str(tmp_path),
                   "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "dev.csv:3: label 'maybe' is not in the label set ['neg', 'pos']" in err


def test_model_from_a_pretraining_run_directory(tmp_path, minilm_dir, caplog):
    """`--model` may be a `python -m flaxbert.pretrain` output dir: its latest checkpoint's encoder."""
    import orbax.checkpoint as ocp
    from flaxbert import pretrain

    run = tmp_path / "pre"
    assert pretrain.main([f"--run.output_dir={run}", "--run.steps=2", "--run.progress=false", "--run.eval_every=0",
                          f"--data.vocab={minilm_dir}", "--model.vocab_size=30522", "--model.num_hidden_layers=1",
                          "--model.hidden_size=64", "--model.num_attention_heads=2", "--model.intermediate_size=128",
                          "--data.seq_len=32", "--run.global_batch_size=8", "--data.max_predictions_per_seq=5"]) == 0
    model = load_model(get_task("sst2"), load_config(tree={"task": {"model": str(run)}}).task)
    assert "sequence_classification head is newly initialised" in caplog.text
    assert model.tokenizer is not None and model.config.hidden_size == 64
    # the encoder is the step-2 checkpoint's, read here straight from orbax's files
    raw = ocp.StandardCheckpointer().restore(run / "checkpoints" / "2" / "state")
    ours = jax.tree_util.tree_leaves_with_path(model.params["bert"])
    ref = dict(jax.tree_util.tree_leaves_with_path(raw["params"]["bert"]))
    assert len(ours) == len(ref)
    for path, value in ours:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref[path]))


def test_swag_multiple_choice_end_to_end(tmp_path, tiny):
    import csv

    header = ["video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
              "ending0", "ending1", "ending2", "ending3", "label"]
    rng = np.random.default_rng(0)
    for name, n in (("train", 32), ("val", 16)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in range(n):
                w.writerow(["v", str(i), "x", "She picks up the guitar.", "She", "gold", "plays a song.",
                            "eats the guitar.", "flies away.", "paints the sky.", str(int(rng.integers(0, 4)))])
    result = finetune(quick_config(tmp_path, "swag", tiny, tmp_path))
    preds = [json.loads(line) for line in (tmp_path / "out" / "dev_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and all(0 <= p["label"] < 4 for p in preds)
    gold = [int(r["label"]) for r in csv.DictReader(open(tmp_path / "val.csv"))]
    assert result.metrics["dev"]["accuracy"] == pytest.approx(np.mean([p["label"] == g for p, g in zip(preds, gold)]))


@needs_data
def test_feature_extraction_and_frozen_encoder(tmp_path, tiny):
    from flaxbert.finetune.linear_probe import extract_and_fit

    cfg = quick_config(tmp_path, "emotion", tiny, DATA / "emotion", max_train_examples=120)
    report = extract_and_fit(cfg, pooling="mean")
    out = tmp_path / "out"
    preds = [json.loads(line)["label"] for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    gold = [ex.label for ex in load_task_data(get_task("emotion"), str(DATA / "emotion"), with_train=False,
                                              max_eval=48).evals["test"]]
    assert report["metrics"]["test"]["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(preds, gold)]))
    assert "precision" in (out / "test_report.txt").read_text() and (out / "test_confusion.png").is_file()
    # head-only training: the encoder leaves the run exactly as it came in
    finetune(quick_config(tmp_path / "f", "emotion", tiny, DATA / "emotion", optim={"freeze_encoder": True}))
    before = hf.load_pretrained(str(tiny), head="sequence_classification", num_labels=6)  # the same fresh head
    after = hf.load_pretrained(str(tmp_path / "f" / "out" / "best_model"), head="auto")
    for a, b in zip(jax.tree.leaves(before.params["bert"]), jax.tree.leaves(after.params["bert"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    head0 = before.params["sequence_classification"]["classifier"]["kernel"]
    head1 = after.params["sequence_classification"]["classifier"]["kernel"]
    assert np.abs(np.asarray(head1) - np.asarray(head0)).max() > 1e-4  # the head did train
