"""Features (NER alignment, SQuAD windows, n-best post-processing) and length-bucketed batching."""

from pathlib import Path

import numpy as np
import pytest

from flaxbert import scores
from flaxbert.infer import batching
from flaxbert.infer import features as F
from flaxbert.finetune.readers import read_squad
from flaxbert.infer.examples import QAExample, TextExample, TokenExample

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from flaxbert.vocab import load_tokenizer
    return load_tokenizer(minilm_dir)


# ----- NER ---------------------------------------------------------------------------------------

def test_ner_first_subtoken_alignment(tokenizer):
    ex = TokenExample(["Kaczynski", "visits", "Szczebrzeszyn"], ["B-PER", "O", "B-LOC"], "x:1")
    labels = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}
    (f,) = F.ner_features(tokenizer, [ex], 64, labels)
    words = f["word_ids"]
    assert words[0] == -1 and words[-1] == -1  # [CLS] ... [SEP]
    assert (words == 0).sum() > 1 and (words == 2).sum() > 1  # both names split into several pieces
    for w, tag in enumerate(ex.tags):
        positions = np.flatnonzero(words == w)
        assert f["token_labels"][positions[0]] == labels[tag]
        assert (f["token_labels"][positions[1:]] == F.IGNORE).all()
    assert f["token_labels"][0] == F.IGNORE and f["token_labels"][-1] == F.IGNORE
    (g,) = F.ner_features(tokenizer, [ex], 64, labels, label_all_tokens=True)
    kacz = np.flatnonzero(words == 0)
    assert g["token_labels"][kacz[0]] == labels["B-PER"] and (g["token_labels"][kacz[1:]] == labels["I-PER"]).all()
    # predictions come back per word from each word's first sub-token; truncated words become O
    pred = np.zeros(len(words), np.int64)
    pred[np.flatnonzero(words == 2)[0]] = 3
    pred[np.flatnonzero(words == 2)[1]] = 1  # a later sub-token's prediction is ignored
    assert F.word_predictions(words, pred, 4, outside=0) == [0, 0, 3, 0]


# ----- SQuAD ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def squad_slice():
    if not DATA.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return read_squad(DATA / "squad" / "dev-v1.1.json")[:150]


def test_squad_training_positions_recover_the_answer(tokenizer, squad_slice):
    s = F.QASettings(max_length=96, doc_stride=32, max_query_length=24)
    feats = F.qa_features(tokenizer, squad_slice, s, training=True)
    assert len(feats) > len(squad_slice)  # long contexts become several windows
    inside = 0
    for f in feats:
        ex = squad_slice[int(f["example_index"])]
        n_question = int(np.sum(f["token_type_ids"] == 0))
        assert n_question <= s.max_query_length + 2  # [CLS] question [SEP]
        assert len(f["input_ids"]) <= s.max_length
        a, b = int(f["start_positions"]), int(f["end_positions"])
        if a == 0:
            assert b == 0
            continue
        inside += 1
        text, start = ex.answers[0]
        span = ex.context[f["offsets"][a, 0]:f["offsets"][b, 1]]
        # the token span covers the answer and no more than the word pieces around it
        assert f["offsets"][a, 0] <= start and f["offsets"][b, 1] >= start + len(text)
        squeeze = lambda t: scores.normalize_answer(t).replace(" ", "")  # noqa: E731
        assert squeeze(text) in squeeze(span)
    assert inside >= len(squad_slice) * 0.8


def test_squad_end_to_end_with_oracle_logits(tokenizer, squad_slice):
    """Features -> logits peaked at the gold tokens -> n-best over windows -> offsets -> EM/F1 = 100."""
    s = F.QASettings(max_length=96, doc_stride=32, max_query_length=24, max_answer_length=40)
    train_feats = F.qa_features(tokenizer, squad_slice, s, training=True)
    eval_feats = F.qa_features(tokenizer, squad_slice, s, training=False)
    starts, ends = [], []
    for tf, ef in zip(train_feats, eval_feats):
        n = len(ef["input_ids"])
        st, en = np.random.default_rng(0).normal(size=(2, n)).astype(np.float32)
        st[int(tf["start_positions"])] += 20
        en[int(tf["end_positions"])] += 20
        starts.append(st)
        ends.append(en)
    preds = F.qa_postprocess(squad_slice, eval_feats, starts, ends, s)
    gold = [scores.SquadExample(ex.qid, tuple(a for a, _ in ex.answers)) for ex in squad_slice]
    result = scores.squad_evaluate(gold, {q: p.text for q, p in preds.items()})
    # a token can be wider than its answer (gold "8" inside the token "18", "gold" in "golden"): 6 of these
    # 150 questions are such, so the oracle is a little below 100
    assert result["f1"] > 95 and result["exact"] > 95
    for ex in squad_slice:
        p = preds[ex.qid]
        assert ex.context[p.start:p.end] == p.text


def test_qa_postprocess_hand_checked():
    context = "The cat sat on the mat."
    ex = QAExample("q", "", context, "Where?", [], False, "x")
    # tokens: [CLS] where ? [SEP] the cat sat on the mat . [SEP]
    offsets = np.array([[-1, -1]] * 4 + [[0, 3], [4, 7], [8, 11], [12, 14], [15, 18], [19, 22], [22, 23]]
                       + [[-1, -1]], np.int32)
    f = {"example_index": np.int32(0), "offsets": offsets, "input_ids": np.zeros(12, np.int32)}
    start = np.full(12, -5.0)
    end = np.full(12, -5.0)
    start[[1, 8, 4]] = [9.0, 3.0, 2.0]  # the best start is in the question: not allowed
    end[[2, 9, 5]] = [9.0, 3.0, 1.0]
    p = F.qa_postprocess([ex], [f], [start], [end], F.QASettings())["q"]
    assert (p.text, p.start, p.end) == ("the mat", 15, 22)
    # max_answer_length=1 rules out 'the mat' (2 tokens) and 'the cat' ... the best single token wins
    p1 = F.qa_postprocess([ex], [f], [start], [end], F.QASettings(max_answer_length=1))["q"]
    assert p1.end - p1.start <= 4 and p1.text == context[p1.start:p1.end]
    # SQuAD 2.0: a strong [CLS] score predicts "no answer"
    start[0], end[0] = 10.0, 10.0
    p2 = F.qa_postprocess([ex], [f], [start], [end], F.QASettings(), version_2=True)["q"]
    assert p2.text == "" and p2.null_score_diff == pytest.approx(20.0 - 6.0)
    p3 = F.qa_postprocess([ex], [f], [start], [end], F.QASettings(), version_2=True, null_threshold=15.0)["q"]
    assert p3.text == "the mat"


# ----- batching ------------------------------------------------------------------------------------

def test_buckets_cover_every_feature_once_with_few_shapes(tokenizer):
    rng = np.random.default_rng(0)
    words = "the a film is good bad very long story about nothing at all".split()
    examples = [TextExample(" ".join(rng.choice(words, rng.integers(1, 60))), None, "0", f"x:{i}") for i in range(203)]
    feats = F.text_features(tokenizer, examples, 128, {"0": 0})
    bounds = batching.bucket_boundaries(128)
    assert bounds == (16, 32, 64, 128)
    seen, shapes, real = [], set(), 0
    for b in batching.make_batches(feats, 16, bounds, shuffle=True, seed=3):
        shapes.add(b["input_ids"].shape)
        assert b["input_ids"].shape[0] == 16
        for row, idx in enumerate(b["index"]):
            if idx < 0:
                assert b["weight"][row] == 0 and b["attention_mask"][row].sum() == 0
                continue
            n = len(feats[idx]["input_ids"])
            assert (b["input_ids"][row, :n] == feats[idx]["input_ids"]).all() and b["attention_mask"][row].sum() == n
            assert (b["input_ids"][row, n:] == 0).all()
            # the bucket is the smallest boundary that fits
            assert b["input_ids"].shape[1] == min(x for x in bounds if x >= n)
            seen.append(int(idx))
        real += batching.real_tokens(b)
    assert sorted(seen) == list(range(len(feats)))
    assert shapes <= {(16, x) for x in bounds}
    assert real == sum(len(f["input_ids"]) for f in feats)
    assert batching.num_batches(feats, 16, bounds) == len(list(batching.make_batches(feats, 16, bounds)))


def test_token_labels_pad_with_ignore_and_choices_pad_last_axis():
    feats = [{"input_ids": np.array([1, 2, 3], np.int32), "token_type_ids": np.zeros(3, np.int32),
              "token_labels": np.array([-100, 4, -100], np.int32), "word_ids": np.array([-1, 0, -1])}]
    (b,) = batching.make_batches(feats, 2, (8,))
    assert b["token_labels"].shape == (2, 8) and (b["token_labels"][0, 3:] == -100).all()
    assert "word_ids" not in b
    mc = [{"input_ids": np.ones((4, 5), np.int32), "token_type_ids": np.zeros((4, 5), np.int32),
           "attention_mask": np.ones((4, 5), np.int32), "label": np.int32(2)}]
    (b,) = batching.make_batches(mc, 2, (16,))
    assert b["input_ids"].shape == (2, 4, 16) and b["attention_mask"][0].sum() == 20 and b["label"][0] == 2


def test_squad_v2_null_answers_end_to_end_with_oracle_logits(tokenizer, squad_slice):
    """v2: unanswerable questions train towards [CLS]; a confident [CLS] predicts "" and the tuned
    threshold recovers the questions whose answer was weakly scored."""
    import dataclasses

    examples = [dataclasses.replace(ex, answers=[], is_impossible=True) if i % 3 == 0 else ex
                for i, ex in enumerate(squad_slice[:60])]
    s = F.QASettings(max_length=96, doc_stride=32, max_query_length=24, max_answer_length=40)
    train_feats = F.qa_features(tokenizer, examples, s, training=True)
    eval_feats = F.qa_features(tokenizer, examples, s, training=False)
    for tf in train_feats:
        if examples[int(tf["example_index"])].is_impossible:
            assert tf["start_positions"] == 0 and tf["end_positions"] == 0
    starts, ends = [], []
    for tf in train_feats:
        n = len(tf["input_ids"])
        st, en = np.zeros(n, np.float32), np.zeros(n, np.float32)
        st[int(tf["start_positions"])] += 10
        en[int(tf["end_positions"])] += 10
        st[0] += 1  # a small [CLS] score everywhere, so answerable questions keep a finite null score
        starts.append(st)
        ends.append(en)
    preds = F.qa_postprocess(examples, eval_feats, starts, ends, s, version_2=True)
    gold = [scores.SquadExample(ex.qid, tuple(a for a, _ in ex.answers)) for ex in examples]
    out = scores.squad_evaluate(gold, {q: p.text for q, p in preds.items()}, "2.0",
                                 null_probs={q: p.null_score_diff for q, p in preds.items()})
    assert out["NoAns_exact"] == 100.0 and out["NoAns_total"] == 20
    # below 100 for the same token-granularity cases as in v1, plus answers that no 96-token window holds
    assert out["HasAns_f1"] > 85 and out["best_f1"] >= out["f1"]
    assert all(p.text == "" for ex, p in zip(examples, (preds[e.qid] for e in examples)) if ex.is_impossible)
