"""Evaluation metrics for fine-tuning: classification, correlation, entity-level NER and SQuAD EM/F1.

Everything here is plain numpy/python on host arrays so it can be checked against the reference
implementations (scikit-learn, scipy, seqeval, the official SQuAD scripts) in tests.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------
# Classification and regression
# ------------------------------------------------------------------------------------------------


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Probabilities from logits on the host (numerically stable)."""
    x = np.asarray(logits)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _as_int_arrays(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D and of equal length, got {t.shape} and {p.shape}")
    return t, p


def accuracy(y_true, y_pred) -> float:
    t, p = _as_int_arrays(y_true, y_pred)
    return float(np.mean(t == p)) if t.size else 0.0


def f1_binary(y_true, y_pred, pos_label=1) -> float:
    """F1 of the positive class (sklearn `f1_score(average='binary')`); 0 when there is no positive."""
    t, p = _as_int_arrays(y_true, y_pred)
    tp = np.sum((t == pos_label) & (p == pos_label))
    denom = np.sum(t == pos_label) + np.sum(p == pos_label)
    return float(2 * tp / denom) if denom else 0.0


def f1_macro(y_true, y_pred, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over classes that occur in y_true or y_pred (as sklearn)."""
    cm = confusion_matrix(y_true, y_pred, num_labels)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean()) if f1.size else 0.0


def matthews_corrcoef(y_true, y_pred) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K, as sklearn); 0 when undefined."""
    t, p = _as_int_arrays(y_true, y_pred)
    labels = np.union1d(t, p)
    cm = confusion_matrix(np.searchsorted(labels, t), np.searchsorted(labels, p), len(labels)).astype(np.float64)
    true_counts, pred_counts = cm.sum(axis=1), cm.sum(axis=0)
    correct, n = np.trace(cm), cm.sum()
    cov_tp = correct * n - np.dot(true_counts, pred_counts)
    cov_pp = n * n - np.dot(pred_counts, pred_counts)
    cov_tt = n * n - np.dot(true_counts, true_counts)
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xm, ym = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.dot(xm, xm) * np.dot(ym, ym))
    return float(np.dot(xm, ym) / denom) if denom else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (scipy's rankdata(method='average'))."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # boundaries of runs of equal values in the sorted order
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty(len(x), np.float64)
    ranks[order] = ranks_sorted
    return ranks


def spearman(x, y) -> float:
    return pearson(_average_ranks(np.asarray(x)), _average_ranks(np.asarray(y)))


def confusion_matrix(y_true, y_pred, num_labels: int) -> np.ndarray:
    """`cm[i, j]` = number of examples with true label i predicted as j (sklearn's orientation)."""
    t, p = _as_int_arrays(y_true, y_pred)
    cm = np.zeros((num_labels, num_labels), np.int64)
    np.add.at(cm, (t.astype(np.int64), p.astype(np.int64)), 1)
    return cm


def save_confusion_matrix_png(cm: np.ndarray, label_names: Sequence[str], path, title: str = "") -> None:
    """Writes the confusion matrix as a PNG heat map with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(label_names)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels=label_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Entity-level NER metrics (seqeval semantics)
# ------------------------------------------------------------------------------------------------

ENTITY_SCHEMES = (None, "IOB2", "IOB1")  # None = conlleval-compatible lenient decoding (seqeval default)


class Entity(NamedTuple):
    sentence: int
    type: str
    start: int  # first token index
    end: int  # last token index, inclusive


def _split_tag(tag: str) -> tuple[str, str]:
    prefix = tag[0] if tag else "O"
    type_ = tag[1:].split("-", maxsplit=1)[-1] or "_"
    return prefix, type_


def _conlleval_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """conlleval's chunk rules (seqeval's default mode); reads BIO and IOB1 tags alike."""
    chunks, prev_prefix, prev_type, begin = [], "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, type_ = _split_tag(tag)
        ended = (prev_prefix in ("E", "S")
                 or (prev_prefix in ("B", "I") and prefix in ("B", "S", "O"))
                 or (prev_prefix not in ("O", ".") and prev_type != type_))
        started = (prefix in ("B", "S")
                   or (prev_prefix in ("E", "S", "O") and prefix in ("E", "I"))
                   or (prefix not in ("O", ".") and prev_type != type_))
        if ended:
            chunks.append((prev_type, begin, i - 1))
        if started:
            begin = i
        prev_prefix, prev_type = prefix, type_
    return chunks


# Strict decoding tables (prefix of previous tag, prefix of this tag, whether types must match),
# following the definitions of the IOB1 and IOB2 schemes as seqeval's strict mode implements them.
_STRICT = {
    "IOB2": dict(
        start={("*", "B", None)},
        inside={("B", "I", True), ("I", "I", True)},
        end={("I", "O", None), ("I", "I", False), ("I", "B", None), ("B", "O", None), ("B", "I", False),
             ("B", "B", None)},
    ),
    "IOB1": dict(
        start={("O", "I", None), ("I", "I", False), ("B", "I", None), ("I", "B", True), ("B", "B", True)},
        inside={("B", "I", True), ("I", "I", True)},
        end={("I", "I", False), ("I", "O", None), ("I", "B", None), ("B", "O", None), ("B", "I", False),
             ("B", "B", True)},
    ),
}


def _matches(table, prev: tuple[str, str], cur: tuple[str, str]) -> bool:
    for p_prefix, c_prefix, same in table:
        if p_prefix not in ("*", prev[0]) or c_prefix != cur[0]:
            continue
        if same is None or (prev[1] == cur[1]) == same:
            return True
    return False


def _strict_entities(tags: Sequence[str], scheme: str) -> list[tuple[str, int, int]]:
    rules = _STRICT[scheme]
    toks = [_split_tag(t) if t != "O" else ("O", "_") for t in tags] + [("O", "_")]
    for tag, (prefix, _) in zip(tags, toks):
        if prefix not in ("B", "I", "O"):
            raise ValueError(f"tag {tag!r} is not valid in the {scheme} scheme (prefixes B, I, O)")
    chunks, i, prev = [], 0, ("O", "_")
    while i < len(toks):
        tok = toks[i]
        if _matches(rules["start"], prev, tok):
            end, inner_prev = i + 1, tok
            while end < len(toks) and _matches(rules["inside"], inner_prev, toks[end]):
                inner_prev = toks[end]
                end += 1
            if _matches(rules["end"], toks[end - 1], toks[end]):
                chunks.append((tok[1], i, end - 1))
            i = end
        else:
            i += 1
        prev = toks[i - 1]
    return chunks


def get_entities(tags: Sequence[str], scheme: str | None = None) -> list[tuple[str, int, int]]:
    """(type, first, last) chunks of one tag sequence.

    scheme=None decodes like conlleval (an I- after O or after another type opens a chunk), which is
    how seqeval scores by default and reads both BIO and IOB1. scheme="IOB2"/"IOB1" decodes strictly
    (seqeval's `mode='strict'`): in IOB2 only B- opens a chunk; in IOB1 B- only separates two
    adjacent chunks of the same type.
    """
    if scheme is None:
        return _conlleval_entities(tags)
    if scheme == "BIO":
        scheme = "IOB2"
    if scheme not in _STRICT:
        raise ValueError(f"unknown tagging scheme {scheme!r}; choose one of {ENTITY_SCHEMES}")
    return _strict_entities(tags, scheme)


class EntityScores(NamedTuple):
    precision: float
    recall: float
    f1: float
    support: int  # number of gold entities


def _prf(tp: int, n_pred: int, n_true: int) -> EntityScores:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return EntityScores(p, r, f, n_true)


def entity_report(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]],
                  scheme: str | None = None) -> dict[str, EntityScores]:
    """Per-type and micro-averaged ("micro avg") entity precision/recall/F1 over sentences."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold sentences but {len(y_pred)} predicted")
    gold, pred = set(), set()
    for s, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {s}: {len(t)} gold tags but {len(p)} predicted")
        gold.update(Entity(s, *e) for e in get_entities(t, scheme))
        pred.update(Entity(s, *e) for e in get_entities(p, scheme))
    report = {}
    for type_ in sorted({e.type for e in gold | pred}):
        g = {e for e in gold if e.type == type_}
        p = {e for e in pred if e.type == type_}
        report[type_] = _prf(len(g & p), len(p), len(g))
    report["micro avg"] = _prf(len(gold & pred), len(pred), len(gold))
    return report


# ------------------------------------------------------------------------------------------------
# SQuAD exact match / F1 (official v1.1 and v2.0 definitions)
# ------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_exact(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str, version: str = "1.1") -> float:
    """Token-overlap F1 of normalised answers. In v2.0 an empty answer scores 1 against an empty one."""
    pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == "2.0" and (not pred_toks or not gold_toks):
        return float(pred_toks == gold_toks)
    same = sum((collections.Counter(pred_toks) & collections.Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


class SquadExample(NamedTuple):
    """One question as the metric needs it: its id and gold answer texts (empty list = unanswerable)."""
    qid: str
    answers: tuple[str, ...]


def _gold_texts(answers: Iterable[str], version: str) -> list[str]:
    if version == "1.1":
        return list(answers)
    texts = [a for a in answers if normalize_answer(a)]
    return texts or [""]


def squad_scores(examples: Sequence[SquadExample], predictions: Mapping[str, str],
                 version: str = "1.1") -> tuple[dict[str, float], dict[str, float]]:
    """Per-question (exact, f1) as the official script computes them; unanswered questions score 0."""
    if version not in ("1.1", "2.0"):
        raise ValueError(f"SQuAD version must be '1.1' or '2.0', got {version!r}")
    exact, f1 = {}, {}
    for ex in examples:
        golds = _gold_texts(ex.answers, version)
        if ex.qid not in predictions:
            exact[ex.qid] = f1[ex.qid] = 0.0
            continue
        pred = predictions[ex.qid]
        exact[ex.qid] = float(max(squad_exact(pred, g) for g in golds))
        f1[ex.qid] = max(squad_f1(pred, g, version) for g in golds)
    return exact, f1


def find_best_null_threshold(examples: Sequence[SquadExample], predictions: Mapping[str, str],
                             scores: Mapping[str, float], null_probs: Mapping[str, float]) -> tuple[float, float]:
    """The null-score threshold that maximises the total score (official `find_best_thresh`).

    Questions are visited in increasing `null_probs`; answering everything below the threshold and
    abstaining above it. Returns (best score in percent, threshold).
    """
    has_ans = {ex.qid: bool(_gold_texts(ex.answers, "2.0")[0]) for ex in examples}
    current = best = sum(1 for q in scores if not has_ans[q])
    best_threshold = 0.0
    for qid in sorted(null_probs, key=lambda q: null_probs[q]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            current += scores[qid]
        elif predictions[qid]:
            current -= 1
        if current > best:
            best, best_threshold = current, null_probs[qid]
    return 100.0 * best / len(scores), best_threshold


def squad_evaluate(examples: Sequence[SquadExample], predictions: Mapping[str, str], version: str = "1.1",
                   null_probs: Mapping[str, float] | None = None, null_threshold: float = 1.0) -> dict[str, float]:
    """EM and F1 in percent. For v2.0 with `null_probs`, questions whose null probability exceeds
    `null_threshold` are answered with "" and the best thresholds for EM and F1 are reported too."""
    exact, f1 = squad_scores(examples, predictions, version)
    if version == "2.0" and null_probs is not None:
        has_ans = {ex.qid: bool(_gold_texts(ex.answers, "2.0")[0]) for ex in examples}
        exact_t = {q: float(not has_ans[q]) if null_probs[q] > null_threshold else s for q, s in exact.items()}
        f1_t = {q: float(not has_ans[q]) if null_probs[q] > null_threshold else s for q, s in f1.items()}
    else:
        exact_t, f1_t = exact, f1
    n = max(len(exact_t), 1)
    out = {"exact": 100.0 * sum(exact_t.values()) / n, "f1": 100.0 * sum(f1_t.values()) / n, "total": len(exact_t)}
    if version == "2.0":
        has_ans = {ex.qid: bool(_gold_texts(ex.answers, "2.0")[0]) for ex in examples}
        for name, keep in (("HasAns", True), ("NoAns", False)):
            qids = [q for q in exact_t if has_ans[q] == keep]
            if qids:
                out[f"{name}_exact"] = 100.0 * sum(exact_t[q] for q in qids) / len(qids)
                out[f"{name}_f1"] = 100.0 * sum(f1_t[q] for q in qids) / len(qids)
                out[f"{name}_total"] = len(qids)
        if null_probs is not None:
            out["best_exact"], out["best_exact_thresh"] = find_best_null_threshold(
                examples, predictions, exact, null_probs)
            out["best_f1"], out["best_f1_thresh"] = find_best_null_threshold(examples, predictions, f1, null_probs)
    return out
