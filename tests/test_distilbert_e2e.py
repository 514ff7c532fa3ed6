"""DistilBERT end to end: `python -m flaxbert.finetune` on slices of emotion and CoNLL-2003 with a small random
DistilBERT (a WordPiece vocabulary trained here, saved as DistilBertTokenizerFast, which makes no token_type_ids),
the saved best model read by transformers' own classes with the same logits, `flaxbert.pipeline` against
transformers' pipelines on the same directories, feature extraction without a pooler, packing, head dropout."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

import flaxbert
from flaxbert import hf
from flaxbert.finetune import __main__ as finetune_cli
from flaxbert.finetune.run import make_loss_fn
from flaxbert.finetune.tasks import get_task
from flaxbert.infer import batching
from flaxbert.pipelines import pipeline
from family_parity import run_finetune_cli, train_wordpiece_vocab

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")
SIZE = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128)
SENTENCES = ["i feel so happy and loved today", "i am scared of what comes next",
             "this makes me furious", "i was surprised by the news from Germany"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


def _save_tokenizer(out: Path):
    """A 1,000-piece uncased WordPiece vocabulary of emotion sentences and CoNLL words, as a DistilBERT tokenizer."""
    train_wordpiece_vocab(out, DATA)
    tok = transformers.DistilBertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True,
                                               model_max_length=SIZE["max_position_embeddings"])
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="module")
def distil_dir(tmp_path_factory):
    """A random bare DistilBertModel with its tokenizer: a real HF model directory."""
    out = tmp_path_factory.mktemp("distilbert")
    tok = _save_tokenizer(out)
    assert "token_type_ids" not in tok("a sentence")  # what the code paths below must not assume
    torch.manual_seed(0)
    transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=tok.vocab_size, **SIZE)).save_pretrained(out)
    return out


def _head_dir(tmp_path, base: Path, cls_name: str, labels, scale: float, output: str = "classifier"):
    """`base` with a transformers head class of random weights, its output layer scaled so arg-maxes are not ties."""
    labels = {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}} if labels else {}
    config = transformers.DistilBertConfig.from_pretrained(base, **labels)
    torch.manual_seed(3)
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        getattr(model, output).weight.mul_(scale)
    out = tmp_path / cls_name
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def _torch_logits(model, enc) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()


def _transformers_loads(cls, model_dir: Path):
    model, info = cls.from_pretrained(model_dir, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    return model


def _same_logits(model_dir: Path, pt_model, texts, **tok_kw) -> float:
    """max |flaxbert - transformers| over the logits of `texts` (a padded batch) from `model_dir`."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = dict(tok(texts, padding=True, return_tensors="np", **tok_kw))
    assert "token_type_ids" not in enc
    ours = hf.load_pretrained(str(model_dir), head="auto")
    assert ours.report.missing == [] and ours.report.initialized == [] and ours.report.unexpected == []
    logits = np.asarray(flaxbert.apply_head(ours.params, enc, ours.config).logits)
    return float(np.abs(logits - _torch_logits(pt_model, enc)).max())


@pytest.fixture(scope="module")
def emotion_run(distil_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("emotion") / "out"
    run_finetune_cli(["--task", "emotion", "--model", str(distil_dir), "--data", str(DATA / "emotion"),
                      "--max-length", "32", "--task.bucket_min=32"], out)
    return out


def test_emotion_finetune_cli_saves_what_transformers_loads(emotion_run):
    metrics = json.loads((emotion_run / "metrics.json").read_text())
    assert metrics["labels"] == ["anger", "fear", "joy", "love", "sadness", "surprise"]
    assert math.isfinite(metrics["eval"]["test"]["accuracy"]) and 0 <= metrics["eval"]["test"]["accuracy"] <= 1
    best = emotion_run / "best_model"
    saved = json.loads((best / "config.json").read_text())
    assert saved["model_type"] == "distilbert" and saved["architectures"] == ["DistilBertForSequenceClassification"]
    assert saved["id2label"]["0"] == "anger" and "type_vocab_size" not in saved
    assert (saved["seq_classif_dropout"], saved["qa_dropout"]) == (0.2, 0.1)
    pt_model = _transformers_loads(transformers.DistilBertForSequenceClassification, best)
    diff = _same_logits(best, pt_model, SENTENCES)
    print(f"emotion best_model: flaxbert vs transformers max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_pipeline_on_the_finetuned_model_matches_transformers(emotion_run):
    """Every label's score, so that near-ties among the barely trained labels cannot make the check flaky."""
    best = emotion_run / "best_model"
    ours = pipeline("text-classification", str(best))(SENTENCES, top_k=6)
    ref = transformers.pipeline("text-classification", model=str(best), tokenizer=str(best), top_k=None,
                                device="cpu")(SENTENCES)
    for got, want in zip(ours, ref):
        got, want = {g["label"]: g["score"] for g in got}, {w["label"]: w["score"] for w in want}
        assert got.keys() == want.keys()
        assert [got[k] for k in sorted(got)] == pytest.approx([want[k] for k in sorted(want)], abs=1e-5)


def test_conll_finetune_cli_saves_what_transformers_loads(distil_dir, tmp_path):
    out = tmp_path / "conll"
    run_finetune_cli(["--task", "conll2003", "--model", str(distil_dir), "--data", str(DATA / "conll2003"),
                      "--max-length", "64", "--task.bucket_min=64"], out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"valid", "test"} and math.isfinite(metrics["eval"]["valid"]["f1"])
    best = out / "best_model"
    pt_model = _transformers_loads(transformers.DistilBertForTokenClassification, best)
    diff = _same_logits(best, pt_model, SENTENCES)
    print(f"conll best_model: flaxbert vs transformers max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_text_classification_pipeline_matches_transformers(distil_dir, tmp_path):
    d = _head_dir(tmp_path, distil_dir, "DistilBertForSequenceClassification", ["negative", "positive"], 20.0)
    ours = pipeline("text-classification", str(d))
    ref = transformers.pipeline("text-classification", model=str(d), tokenizer=str(d), top_k=None, device="cpu")
    for got, want in zip(ours(SENTENCES, top_k=2), ref(SENTENCES)):
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-4)
    pair = ours(("i feel happy", "i feel sad"))  # a pair without token types: [SEP] alone separates them
    assert pair["label"] in ("negative", "positive")


def test_ner_pipeline_matches_transformers_first_aggregation(distil_dir, tmp_path):
    d = _head_dir(tmp_path, distil_dir, "DistilBertForTokenClassification", NER_LABELS, 60.0)
    ours = pipeline("ner", str(d))
    ref = transformers.pipeline("token-classification", model=str(d), tokenizer=str(d), aggregation_strategy="first",
                                device="cpu")
    n_entities = 0
    for text in ["Angela Merkel met Emmanuel Macron in Strasbourg on Tuesday.",
                 "The Wojciechowski family moved from Szczebrzeszyn to New York City."]:
        got, want = ours(text), ref(text)
        assert [(e["entity"], e["start"], e["end"]) for e in got] == \
            [(w["entity_group"], w["start"], w["end"]) for w in want]
        n_entities += len(got)
    assert n_entities > 0  # the random head must tag something for the comparison to mean anything


def test_question_answering_pipeline_matches_transformers(distil_dir, tmp_path):
    """Spans widened to whole words as transformers' pipeline does by default (align_to_words), and the tokens'
    own spans with align_to_words=False; on this 1,000-piece vocabulary most words are several tokens."""
    d = _head_dir(tmp_path, distil_dir, "DistilBertForQuestionAnswering", None, 30.0, output="qa_outputs")
    ours = pipeline("question-answering", str(d), max_length=128)
    ref = transformers.pipeline("question-answering", model=str(d), tokenizer=str(d), device="cpu")
    context = ("Angela Merkel met Emmanuel Macron in Strasbourg on Tuesday. They talked about the news from "
               "Germany and France, and about the weather in New York City.")
    widened = 0
    for question in ["Who met Macron?", "Where did they meet?", "What did they talk about?", "When?"]:
        for align in (True, False):
            got = ours(question=question, context=context, align_to_words=align)
            want = ref(question=question, context=context, max_answer_len=30, align_to_words=align)
            assert (got["start"], got["end"], got["answer"]) == (want["start"], want["end"], want["answer"])
            assert got["score"] == pytest.approx(want["score"], rel=1e-4)
            assert context[got["start"]:got["end"]] == got["answer"]
        widened += ours(question=question, context=context)["answer"] != got["answer"]
    assert widened > 0  # some answer of the random head ends inside a word, so the widening is exercised


def test_feature_extraction_without_a_pooler(distil_dir, tmp_path, capsys):
    common = ["--task", "emotion", "--model", str(distil_dir), "--data", str(DATA / "emotion"), "--max-length", "32",
              "--max-train-examples", "48", "--max-eval-examples", "24", "--features", "--no-progress"]
    assert finetune_cli.main(common + ["--pooling", "pooled", "--output-dir", str(tmp_path / "pooled")]) == 2
    err = capsys.readouterr().err
    assert "pooling 'pooled'" in err and "'distilbert' has none" in err and "'cls'" in err and "'mean'" in err
    for pooling in ("cls", "mean"):
        assert finetune_cli.main(common + ["--pooling", pooling, "--output-dir", str(tmp_path / pooling)]) == 0
        report = json.loads((tmp_path / pooling / "metrics.json").read_text())
        assert report["pooling"] == pooling and math.isfinite(report["metrics"]["test"]["accuracy"])
    model = hf.load_pretrained(str(distil_dir), head=None)
    from flaxbert.finetune.linear_probe import make_embed
    tok = model.tokenizer(SENTENCES[:2], padding=True, return_tensors="np")
    (cls,) = make_embed(model.config, "cls")(model.params, dict(tok))
    with torch.no_grad():
        ref = transformers.DistilBertModel.from_pretrained(distil_dir).eval()(
            **{k: torch.tensor(v) for k, v in tok.items()}).last_hidden_state[:, 0].numpy()
    assert float(np.abs(np.asarray(cls) - ref).max()) <= 1e-5  # "cls" is DistilBERT's own token-0 state


def test_packed_rows_give_the_unpacked_loss(distil_dir):
    """DistilBERT's pre_classifier reads each packed example's own [CLS] (cls_positions), so a packed step's loss
    and gradients are the bucketed step's."""
    model = hf.load_pretrained(str(distil_dir), head="sequence_classification", num_labels=3)
    task = get_task("emotion").with_labels(["a", "b", "c"])
    enc = model.tokenizer(SENTENCES)
    feats = [{"input_ids": np.asarray(ids, np.int32), "label": np.int32(i % 3)} for i, ids in enumerate(enc["input_ids"])]
    loss_fn = make_loss_fn(task, model.config)
    strip = lambda b: {k: v for k, v in b.items() if k != "index"}  # noqa: E731
    (bucketed,) = batching.make_batches(feats, 4, (16,))
    packed = batching.pack_batch(feats, list(range(4)), 32, 4)
    assert packed["input_ids"].shape[0] < 4  # the examples share rows
    value = lambda b: jax.value_and_grad(lambda p: (lambda t: t[0] / t[1])(loss_fn(p, strip(b), None).terms["ce"]))(  # noqa: E731
        model.params)
    (a, ga), (b, gb) = value(bucketed), value(packed)
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def _toy_batch(head):
    shape = (3, 2, 12) if head == "multiple_choice" else (3, 12)
    ids = np.random.default_rng(0).integers(5, 100, shape).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones(shape, np.int32)}


@pytest.mark.parametrize("head,field,other", [("sequence_classification", "seq_classif_dropout", "qa_dropout"),
                                              ("multiple_choice", "seq_classif_dropout", "qa_dropout"),
                                              ("question_answering", "qa_dropout", "seq_classif_dropout")])
def test_head_dropout_is_distilberts_own(head, field, other):
    """As in HF: the sentence heads drop out at seq_classif_dropout, the QA head at qa_dropout, each only its own
    (the encoder's dropout is 0 here, so any change under a dropout rng is the head's)."""
    cfg = flaxbert.BertConfig.tiny(vocab_size=100, max_position_embeddings=64, model_type="distilbert",
                                   type_vocab_size=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    params = flaxbert.init(cfg, jax.random.key(0), head=head, num_labels=3)
    batch, rng = _toy_batch(head), jax.random.key(1)

    def changed(**rates):
        c = cfg.replace(**rates)
        plain, dropped = (jax.tree.leaves(flaxbert.apply_head(params, batch, c, dropout_rng=r)) for r in (None, rng))
        return not all(np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(plain, dropped))

    assert changed(**{field: 0.5, other: 0.0})
    assert not changed(**{field: 0.0, other: 0.5})


def test_head_dropout_config_round_trip():
    hf_config = transformers.DistilBertConfig(vocab_size=100, seq_classif_dropout=0.3, qa_dropout=0.05, **SIZE)
    cfg = flaxbert.BertConfig.from_hf_config(hf_config.to_dict())
    assert (cfg.seq_classif_dropout, cfg.qa_dropout) == (0.3, 0.05)
    back = cfg.to_hf_config()
    assert (back["seq_classif_dropout"], back["qa_dropout"]) == (0.3, 0.05)
    bert = flaxbert.BertConfig.tiny()
    assert not {"seq_classif_dropout", "qa_dropout"} & set(bert.to_hf_config())
    with pytest.raises(flaxbert.ConfigError,
                       match=r"seq_classif_dropout is not a setting of model_type 'bert'"):
        flaxbert.BertConfig.tiny(seq_classif_dropout=0.3)
    with pytest.raises(ValueError, match=r"BertConfig.qa_dropout must be in \[0, 1\)"):
        flaxbert.BertConfig.tiny(model_type="distilbert", type_vocab_size=0, qa_dropout=1.5)


def test_features_carry_no_token_types_when_the_tokenizer_makes_none(distil_dir):
    from flaxbert.infer import features as F
    from flaxbert.infer.examples import ChoiceExample, QAExample, TextExample

    tok = transformers.AutoTokenizer.from_pretrained(distil_dir)
    (pair,) = F.text_features(tok, [TextExample("i feel happy", "i feel sad", None, "x")], 32, with_labels=False)
    (choice,) = F.choice_features(tok, [ChoiceExample("he sat", "then he", ["stood up", "ate a big dinner"], 1, "x")],
                                  32)
    qa = F.qa_features(tok, [QAExample("q", "", "Merkel met Macron.", "Who?", [("Macron", 11)], False, "x")],
                       F.QASettings(max_length=32, doc_stride=8, max_query_length=8), training=True)
    for f in (pair, choice, *qa):
        assert "token_type_ids" not in f
    expected = [tok(["he sat"] * 2, ["then he stood up", "then he ate a big dinner"])["input_ids"][c] for c in (0, 1)]
    for c, ids in enumerate(expected):
        assert choice["input_ids"][c, :len(ids)].tolist() == ids and choice["attention_mask"][c].sum() == len(ids)
    start, end = int(qa[0]["start_positions"]), int(qa[0]["end_positions"])
    assert tok.decode(qa[0]["input_ids"][start:end + 1]) == "macron"  # the answer found by sequence ids alone
