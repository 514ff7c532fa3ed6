"""flaxbert.scores against scikit-learn, scipy, seqeval and the official SQuAD definitions."""

import random

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
from seqeval import metrics as seqeval_metrics
from seqeval.scheme import IOB1, IOB2
from transformers.data.metrics import squad_metrics as hf_squad  # HF's port of the official v2.0 script

from flaxbert import scores


# ----- classification / regression --------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 200)), int(rng.integers(2, 6))
    t, p = rng.integers(0, k, n), rng.integers(0, k, n)
    p[: n // 3] = t[: n // 3]  # make predictions correlated with the truth
    assert scores.accuracy(t, p) == pytest.approx(sklearn.metrics.accuracy_score(t, p))
    assert scores.matthews_corrcoef(t, p) == pytest.approx(sklearn.metrics.matthews_corrcoef(t, p))
    assert np.array_equal(scores.confusion_matrix(t, p, k), sklearn.metrics.confusion_matrix(t, p, labels=range(k)))
    assert scores.f1_macro(t, p, k + 1) == pytest.approx(sklearn.metrics.f1_score(t, p, average="macro"))
    tb, pb = t % 2, p % 2
    assert scores.f1_binary(tb, pb) == pytest.approx(sklearn.metrics.f1_score(tb, pb))


def test_degenerate_classification_cases():
    # constant predictions: MCC is undefined and sklearn (like us) returns 0
    assert scores.matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0
    assert sklearn.metrics.matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0
    # no positive anywhere: F1 is 0 (sklearn warns and returns 0)
    assert scores.f1_binary([0, 0], [0, 0]) == 0.0
    # hand-checked: tp=1, fp=1, fn=1 -> P=R=F1=0.5
    assert scores.f1_binary([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    if seed % 2:  # STS-B gold scores have many ties
        x, y = np.round(x * 2) / 2, np.round(y)
    assert scores.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert scores.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)


def test_confusion_matrix_png(tmp_path):
    cm = scores.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
    out = tmp_path / "cm.png"
    scores.save_confusion_matrix_png(cm, ["a", "b", "c"], out, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- entity-level NER --------------------------------------------------------------------------

def _seqeval_report(y_true, y_pred, scheme):
    kwargs = {} if scheme is None else dict(mode="strict", scheme={"IOB2": IOB2, "IOB1": IOB1}[scheme])
    return seqeval_metrics.classification_report(y_true, y_pred, output_dict=True, zero_division=0, **kwargs)


def _assert_matches_seqeval(y_true, y_pred, scheme):
    ours = scores.entity_report(y_true, y_pred, scheme)
    ref = _seqeval_report(y_true, y_pred, scheme)
    ref_types = {k for k in ref if not k.endswith(" avg")}
    # seqeval lists only types that occur in the gold data with support > 0 in micro average;
    # compare every type it reports and the micro average
    for name in ref_types | {"micro avg"}:
        r = ref[name]
        o = ours.get(name, scores.EntityScores(0.0, 0.0, 0.0, 0))
        assert (o.precision, o.recall, o.f1, o.support) == pytest.approx(
            (r["precision"], r["recall"], r["f1-score"], r["support"])), (name, y_true, y_pred)


def _random_tags(rng, n, prefixes):
    return [rng.choice(["O"] + [f"{p}-{t}" for p in prefixes for t in ("PER", "LOC")]) for _ in range(n)]


@pytest.mark.parametrize("scheme", [None, "IOB2", "IOB1"])
def test_entity_report_matches_seqeval_on_random_sequences(scheme):
    rng = random.Random(0)
    for _ in range(200):
        n_sent = rng.randint(1, 4)
        y_true = [_random_tags(rng, rng.randint(1, 8), "BI") for _ in range(n_sent)]
        y_pred = [[t if rng.random() < 0.6 else rng.choice(["O", "B-PER", "I-PER", "I-LOC", "B-LOC"]) for t in s]
                  for s in y_true]
        _assert_matches_seqeval(y_true, y_pred, scheme)


def test_entities_bio_vs_iob1_hand_checked():
    seq = ["I-PER", "I-PER", "B-PER", "O", "B-LOC", "I-LOC", "I-ORG"]
    # conlleval/default: an I- after O opens an entity; B- always opens one; a type change splits
    assert scores.get_entities(seq) == [("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 5), ("ORG", 6, 6)]
    # strict BIO: I- without B- is not an entity (the I-ORG and the leading I-PER I-PER are dropped)
    assert scores.get_entities(seq, "IOB2") == [("PER", 2, 2), ("LOC", 4, 5)]
    # strict IOB1: I- opens entities, B- only separates two same-type neighbours, so B-LOC after O
    # opens nothing and the LOC entity starts at the I-LOC that follows it
    assert scores.get_entities(seq, "IOB1") == [("PER", 0, 1), ("PER", 2, 2), ("LOC", 5, 5), ("ORG", 6, 6)]
    for scheme in (None, "IOB2", "IOB1"):
        _assert_matches_seqeval([seq], [seq], scheme)


def test_entity_report_empty_predictions_and_hand_checked_scores():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]]
    y_pred = [["O", "O", "O", "O"], ["O"]]
    rep = scores.entity_report(y_true, y_pred)
    assert rep["micro avg"] == (0.0, 0.0, 0.0, 3)
    _assert_matches_seqeval(y_true, y_pred, None)
    # one right (PER), one wrong boundary (LOC predicted too long), one missed (ORG): P=1/2, R=1/3
    y_pred = [["B-PER", "I-PER", "B-LOC", "I-LOC"], ["O"]]
    p, r, f, s = scores.entity_report(y_true, y_pred)["micro avg"]
    assert (p, r, s) == (pytest.approx(0.5), pytest.approx(1 / 3), 3)
    assert f == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    _assert_matches_seqeval(y_true, y_pred, None)


# ----- SQuAD ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("an apple a day", "apple day"),
    ("  Theatre  of the   Absurd. ", "theatre of absurd"),  # 'the' inside a word stays
    ("A.B.C.", "abc"),
    ("“quoted”", "“quoted”"),  # only ASCII punctuation is removed, as the official script does
    ("the", ""),
])
def test_squad_normalization_hand_checked(text, normalized):
    assert scores.normalize_answer(text) == normalized
    assert hf_squad.normalize_answer(text) == normalized


def test_squad_em_f1_hand_checked():
    # 'the' and punctuation do not count: exact match
    assert scores.squad_exact("the Denver Broncos.", "Denver Broncos") == 1
    # 2 shared tokens of 3 predicted and 2 gold: P=2/3, R=1, F1=0.8
    assert scores.squad_f1("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # v1.1: an empty prediction scores 0 F1; v2.0: empty vs empty is a match
    assert scores.squad_f1("", "Broncos") == 0.0
    assert scores.squad_f1("", "", version="2.0") == 1.0
    assert scores.squad_f1("a", "the", version="2.0") == 1.0  # both normalise to empty
    ex = [scores.SquadExample("q1", ("Denver Broncos", "The Broncos")), scores.SquadExample("q2", ("1990",)),
          scores.SquadExample("q3", ("x",))]
    out = scores.squad_evaluate(ex, {"q1": "Broncos", "q2": "in 1990"})  # q3 unanswered -> 0
    # q1: best over golds is 'The Broncos' (exact); q2: P=1/2 R=1 F1=2/3
    assert out["exact"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_squad_v2_matches_official_definition():
    rng = random.Random(1)
    words = ["the", "a", "Denver", "Broncos", "1990", "river", "Nile", ",", "."]
    examples, preds, na_probs, hf_gold = [], {}, {}, {}
    for i in range(300):
        qid = f"q{i}"
        n_gold = rng.choice([0, 1, 2])
        golds = tuple(" ".join(rng.choices(words, k=rng.randint(1, 4))) for _ in range(n_gold))
        examples.append(scores.SquadExample(qid, golds))
        preds[qid] = "" if rng.random() < 0.3 else " ".join(rng.choices(words, k=rng.randint(1, 4)))
        na_probs[qid] = rng.random()
        hf_gold[qid] = [g for g in golds if hf_squad.normalize_answer(g)] or [""]
    ours_exact, ours_f1 = scores.squad_scores(examples, preds, "2.0")
    for qid in preds:
        assert ours_exact[qid] == max(hf_squad.compute_exact(g, preds[qid]) for g in hf_gold[qid])
        assert ours_f1[qid] == pytest.approx(max(hf_squad.compute_f1(g, preds[qid]) for g in hf_gold[qid]))
    has_ans = {q: bool(hf_gold[q][0]) for q in preds}
    for per_question in (ours_exact, ours_f1):
        best, thresh = scores.find_best_null_threshold(examples, preds, per_question, na_probs)
        ref_best, ref_thresh = hf_squad.find_best_thresh(preds, per_question, na_probs, has_ans)
        assert (best, thresh) == pytest.approx((ref_best, ref_thresh))
    ours = scores.squad_evaluate(examples, preds, "2.0", null_probs=na_probs, null_threshold=0.5)
    ref_exact = hf_squad.apply_no_ans_threshold(ours_exact, na_probs, has_ans, 0.5)
    assert ours["exact"] == pytest.approx(100 * sum(ref_exact.values()) / len(ref_exact))
