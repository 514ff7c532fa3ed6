"""The CRF head in fine-tuning (`--task.crf=true`): the loss through the head (finite gradients, padding and
unscored positions without effect, the CRF of the scored positions alone), Viterbi decoding, saving beside a
transformers-loadable BertForTokenClassification directory, restoring, and the pipeline."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxbert
from flaxbert import crf, crf_io
from flaxbert.errors import ConfigError
from flaxbert.finetune import __main__ as cli
from flaxbert.finetune.run import evaluate_model, load_config, make_loss_fn
from flaxbert.finetune.tasks import get_task
from flaxbert.heads import CRF_SCALE, TokenCRFOutput, crf_params
from flaxbert.infer import batching
from flaxbert.infer import features as F

from test_finetune_run import DATA, make_tiny_model, needs_data

HEAD = "token_classification_crf"
LABELS = ["O", "B-X", "I-X"]


@pytest.fixture(scope="module")
def small():
    cfg = flaxbert.BertConfig.tiny(vocab_size=200, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)
    params = flaxbert.init(cfg, jax.random.key(1), head=HEAD, num_labels=3)
    # non-zero CRF scores, so that the transitions matter in every check below
    rng = np.random.default_rng(0)
    for name, shape in (("transitions", (3, 3)), ("start", (3,)), ("end", (3,))):
        params[HEAD][name] = jnp.asarray(rng.normal(size=shape) / CRF_SCALE, jnp.float32)
    task = get_task("ner").with_labels(LABELS)
    task = load_config(tree={"task": {"name": "ner", "crf": True}}).task.configured(task)
    return cfg, params, task


def features():
    # row 1: words at 1, 3 (token 2 is a later sub-token); row 2: one word
    return [{"input_ids": np.array([2, 5, 6, 7, 3], np.int32), "token_type_ids": np.zeros(5, np.int32),
             "token_labels": np.array([-100, 1, -100, 2, -100], np.int32),
             "word_ids": np.array([-1, 0, 0, 1, -1], np.int32)},
            {"input_ids": np.array([2, 9, 3], np.int32), "token_type_ids": np.zeros(3, np.int32),
             "token_labels": np.array([-100, 1, -100], np.int32), "word_ids": np.array([-1, 0, -1], np.int32)}]


def batch_of(feats, batch_size, length):
    (batch,) = batching.make_batches(feats, batch_size, (length,))
    return {k: v for k, v in batch.items() if k not in ("index", "word_ids")}


def test_head_params_axes_and_table(small):
    cfg, _, _ = small
    fresh = flaxbert.init(cfg, jax.random.key(0), head=HEAD, num_labels=4)[HEAD]
    assert fresh["transitions"].shape == (4, 4) and fresh["start"].shape == fresh["end"].shape == (4,)
    assert not np.any(fresh["transitions"]) and not np.any(fresh["start"])  # starts as the per-token softmax
    axes = flaxbert.logical_axes(cfg, HEAD, 4)[HEAD]
    assert tuple(axes["transitions"]) == ("labels", "labels") and tuple(axes["classifier"]["kernel"]) == (
        "embed", "labels")


def test_loss_is_the_crf_of_the_scored_positions_with_finite_gradients(small):
    cfg, params, task = small
    batch = batch_of(features(), 4, 8)
    loss_fn = make_loss_fn(task, cfg)
    total, tokens = loss_fn(params, batch, None).terms["crf_nll"]
    assert float(tokens) == 3.0  # scored tokens only (filler rows and -100 carry nothing)
    # the same CRF on the scored positions packed side by side: emissions gathered, a contiguous mask
    out = flaxbert.apply_head(params, batch, cfg, head=HEAD)
    em = jnp.stack([out.logits[0, jnp.array([1, 3])], out.logits[1, jnp.array([1, 1])]])
    ll = crf.log_likelihood(em, jnp.array([[1, 2], [1, 0]]), jnp.array([[1, 1], [1, 0]], bool), out.crf)
    assert float(total) == pytest.approx(-float(ll.sum()), rel=1e-5)
    grads = jax.grad(lambda p: (lambda t: t[0] / t[1])(loss_fn(p, batch, None).terms["crf_nll"]))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert np.abs(grads[HEAD]["transitions"]).sum() > 0 and np.abs(grads["bert"]["embeddings"]
                                                                     ["word_embeddings"]).sum() > 0


def test_padding_and_unscored_positions_change_nothing(small):
    cfg, params, task = small
    loss_fn = make_loss_fn(task, cfg)
    short, long_ = batch_of(features(), 4, 8), batch_of(features(), 6, 16)
    ref = loss_fn(params, short, None).terms["crf_nll"]
    other_pad = dict(long_, input_ids=np.where(long_["attention_mask"] > 0, long_["input_ids"], 17))
    for b in (long_, other_pad):
        got = loss_fn(params, b, None).terms["crf_nll"]
        assert float(got[0]) == pytest.approx(float(ref[0]), rel=1e-5) and float(got[1]) == float(ref[1])
    # emission scores at unscored positions (special tokens, later sub-tokens, padding) do not enter
    out = flaxbert.apply_head(params, short, cfg, head=HEAD)
    noise = jnp.where(short["token_labels"][..., None] < 0, 50.0 * jax.random.normal(jax.random.key(3),
                                                                                     out.logits.shape), 0.0)
    noisy = task.spec.loss(TokenCRFOutput(out.logits + noise, out.crf), short).terms["crf_nll"]
    assert float(noisy[0]) == pytest.approx(float(ref[0]), rel=1e-5)
    # nor do they in decoding
    logits = [np.asarray(out.logits[0, :5]), np.asarray(out.logits[1, :3])]
    masks = [F.word_starts(f["word_ids"]) for f in features()]
    tags = crf.decode(logits, masks, out.crf)
    moved = [x + np.where(m[:, None], 0.0, np.random.default_rng(4).normal(size=x.shape) * 50) for x, m in
             zip(logits, masks)]
    assert all(np.array_equal(a, b) for a, b in zip(tags, crf.decode(moved, masks, out.crf)))
    # and decoding is the Viterbi path of the scored positions alone
    alone, _ = crf.viterbi(jnp.asarray(logits[0][[1, 3]])[None], jnp.ones((1, 2), bool), out.crf)
    assert list(tags[0][[1, 3]]) == list(np.asarray(alone[0]))


def test_crf_needs_a_ner_task():
    with pytest.raises(ConfigError, match="task.crf=true is for NER tasks.*classification"):
        load_config(tree={"task": {"name": "sst2", "crf": True}})
    with pytest.raises(ConfigError, match="label_all_tokens"):
        load_config(tree={"task": {"name": "conll2003", "crf": True, "label_all_tokens": True}})


def test_cli_crf_on_a_classification_task_is_one_line(capsys):
    rc = cli.main(["--task", "sst2", "--model", "nowhere", "--data", "nowhere", "--task.crf=true", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "task.crf=true is for NER tasks" in err[0]


def bio_ok(tags):
    prev = "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:
            return False
        prev = t
    return True


@needs_data
def test_cli_crf_end_to_end_saves_loads_and_decodes(tmp_path, minilm_dir, capsys):
    tiny = make_tiny_model(tmp_path / "tiny", minilm_dir)
    out = tmp_path / "out"
    rc = cli.main(["--task", "conll2003", "--model", str(tiny), "--data", str(DATA / "conll2003"),
                   "--output-dir", str(out), "--epochs", "1", "--max-length", "64", "--max-train-examples", "64",
                   "--max-eval-examples", "48", "--no-progress", "--task.bucket_min=64",
                   "--run.global_batch_size=16", "--optim.lr=1e-3", "--task.crf=true"])
    assert rc == 0, capsys.readouterr().err
    best = out / "best_model"
    assert (best / crf_io.FILE).is_file() and crf_io.constrained(str(best))
    # transformers reads the directory as a plain BertForTokenClassification
    import transformers
    model, info = transformers.BertForTokenClassification.from_pretrained(str(best), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    labels = json.loads((out / "metrics.json").read_text())["labels"]
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    # every decoded tag sequence obeys BIO, and the F1 is the reference metric of the written predictions
    preds = [json.loads(line) for line in (out / "valid_predictions.jsonl").read_text().splitlines()]
    assert preds and all(bio_ok(p["tags"]) for p in preds)
    assert len(preds) == 48
    saved = json.loads((out / "metrics.json").read_text())["eval"]
    # the restored model (classifier + crf.safetensors) scores what the run reported
    restored = crf_io.load_pretrained(str(best))
    assert restored.head == HEAD and not restored.report.initialized
    again = evaluate_model(load_config(tree={
        "task": {"name": "conll2003", "model": str(best), "data": str(DATA / "conll2003"), "crf": True,
                 "max_length": 64, "bucket_min": 64, "max_eval_examples": 48},
        "run": {"output_dir": str(tmp_path / "again"), "progress": False}}))
    assert again["valid"] == pytest.approx(saved["valid"], abs=1e-6)
    # the pipeline finds the CRF and decodes with Viterbi
    ner = flaxbert.pipeline("ner", str(best), max_length=64)
    assert ner.crf is not None
    np.testing.assert_allclose(np.asarray(crf_params(restored.params[HEAD]).transitions)[0, 0],
                               np.asarray(ner.crf.transitions)[0, 0], rtol=1e-6)
    assert isinstance(ner("EU rejects German call to boycott British lamb ."), list)
