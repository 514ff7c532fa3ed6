"""Examples -> model features (unpadded int32 arrays), and model outputs -> answers.

A feature is a dict of numpy arrays whose last axis is the sequence (`input_ids`, `token_type_ids` when the
tokenizer makes them (DistilBERT's does not, and the encoder then takes zeros), and for NER `token_labels`,
-100 = not scored) plus per-feature targets (`label`, `start_positions`,
`end_positions`). Padding happens later, in `batching`, to a few bucket lengths.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Optional, Sequence

import numpy as np

from flaxbert.errors import ConfigError, DataError
from flaxbert.infer.examples import ChoiceExample, QAExample, TextExample, TokenExample
from flaxbert.scores import softmax

IGNORE = -100  # token label of positions that are not scored (special tokens, later sub-tokens)


def _check_label(label, label_to_id: dict, where: str) -> int:
    if label is None:
        raise DataError(f"{where}: the example has no label")
    if label not in label_to_id:
        raise DataError(f"{where}: label {label!r} is not in the label set {list(label_to_id)}")
    return label_to_id[label]


def encoded_arrays(enc, i: Optional[int] = None) -> dict:
    """int32 `input_ids` (and `token_type_ids` where the tokenizer made them) of row `i` of a tokenizer's
    output, or of an unbatched encoding with `i=None`."""
    row = (lambda v: v) if i is None else (lambda v: v[i])  # noqa: E731
    return {k: np.asarray(row(enc[k]), np.int32) for k in ("input_ids", "token_type_ids") if k in enc}


# ------------------------------------------------------------------------------------------------
# Sequence classification / regression
# ------------------------------------------------------------------------------------------------


def text_features(tokenizer, examples: Sequence[TextExample], max_length: int,
                  label_to_id: Optional[dict] = None, regression: bool = False, with_labels: bool = True) -> list[dict]:
    """[CLS] text [SEP] (text_pair [SEP]); pairs are truncated longest-first to `max_length`."""
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples]
    has_pairs = any(p is not None for p in pairs)
    enc = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_length)
    out = []
    for i, ex in enumerate(examples):
        f = encoded_arrays(enc, i)
        if with_labels:
            if regression:
                if ex.label is None:
                    raise DataError(f"{ex.where}: the example has no score")
                f["label"] = np.float32(ex.label)
            else:
                f["label"] = np.int32(_check_label(ex.label, label_to_id, ex.where))
        out.append(f)
    return out


# ------------------------------------------------------------------------------------------------
# Token classification (NER)
# ------------------------------------------------------------------------------------------------


def ner_features(tokenizer, examples: Sequence[TokenExample], max_length: int, label_to_id: Optional[dict],
                 label_all_tokens: bool = False) -> list[dict]:
    """Word tags are put on each word's first sub-token; the other sub-tokens get IGNORE, or with
    `label_all_tokens` the word's tag (B-X continued as I-X). `word_ids` maps tokens back to words
    (-1 for special tokens) for predictions; words cut off by truncation are predicted 'O'."""
    enc = for_split_words(tokenizer)([ex.words for ex in examples], is_split_into_words=True, truncation=True,
                                     max_length=max_length)
    out = []
    for i, ex in enumerate(examples):
        f = encoded_arrays(enc, i)
        word_ids = np.asarray([-1 if w is None else w for w in enc.word_ids(i)], np.int32)
        f["word_ids"] = word_ids
        if ex.tags is not None and label_to_id is not None:
            tag_ids = [_check_label(t, label_to_id, f"{ex.where} (word {j + 1}, {ex.words[j]!r})")
                       for j, t in enumerate(ex.tags)]
            labels = np.full(len(word_ids), IGNORE, np.int32)
            prev = -1
            for pos, w in enumerate(word_ids):
                if w < 0:
                    pass
                elif w != prev:
                    labels[pos] = tag_ids[w]
                elif label_all_tokens:
                    tag = ex.tags[w]
                    inside = "I-" + tag[2:] if tag.startswith("B-") else tag
                    labels[pos] = label_to_id.get(inside, tag_ids[w])
                prev = w
            f["token_labels"] = labels
        out.append(f)
    return out


def for_split_words(tokenizer):
    """The tokenizer to encode words already split with. A byte-level BPE tokenizer (RoBERTa's) marks a word's
    start by the space before it, so each word must get one: transformers allows that only for a tokenizer made
    with add_prefix_space=True, and refuses the others. Such a copy is loaded from the tokenizer's directory,
    as HF's run_ner loads it; other tokenizers are returned as they are."""
    if getattr(tokenizer, "add_prefix_space", True) is not False:
        return tokenizer
    source = getattr(tokenizer, "name_or_path", "")
    if not os.path.isdir(source):
        raise DataError(f"{type(tokenizer).__name__} {source!r}: a byte-level BPE tokenizer needs "
                        "add_prefix_space=True to encode split words (NER), and it was not loaded from a directory "
                        "it could be reloaded from with that setting")
    return _prefixed(type(tokenizer), source)


@functools.lru_cache(maxsize=8)
def _prefixed(cls, source: str):
    return cls.from_pretrained(source, add_prefix_space=True)


def word_starts(word_ids: np.ndarray) -> np.ndarray:
    """[seq] bool: the first sub-token of each word (the positions NER scores)."""
    w = np.asarray(word_ids)
    return (w >= 0) & (w != np.concatenate([[-1], w[:-1]]))


def word_predictions(word_ids: np.ndarray, token_pred: np.ndarray, num_words: int, outside: int) -> list[int]:
    """A word's prediction is its first sub-token's; words without a token (truncated) get `outside`."""
    words = [outside] * num_words
    seen = set()
    for pos, w in enumerate(word_ids):
        if w >= 0 and w not in seen:
            seen.add(w)
            words[w] = int(token_pred[pos])
    return words


# ------------------------------------------------------------------------------------------------
# Extractive QA (SQuAD)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QASettings:
    max_length: int = 384
    doc_stride: int = 128  # tokens of overlap between consecutive windows over a long context
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30


def _truncate_question(tokenizer, question: str, max_query_length: int) -> str:
    question = question.lstrip()  # some SQuAD questions start with spaces that only waste tokens
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_query_length:
        return question
    return question[: enc["offset_mapping"][max_query_length - 1][1]]


def _check_windows(tokenizer, questions: Sequence[str], settings: QASettings) -> None:
    """A ConfigError when a window would hold no more context tokens than `doc_stride` (the overlap between
    windows) after the longest question, which the tokenizer would refuse deep inside."""
    if not questions:
        return
    longest = max(len(ids) for ids in tokenizer(list(questions), add_special_tokens=False)["input_ids"])
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = settings.max_length - longest - specials
    if settings.doc_stride >= room:
        raise ConfigError(f"question answering: a window of max_length {settings.max_length} tokens holds "
                          f"{max(room, 0)} context tokens after a question of {longest} tokens and {specials} special "
                          f"tokens, not more than doc_stride={settings.doc_stride} (the overlap between windows): lower "
                          f"doc_stride or max_query_length (task.doc_stride, task.max_query_length), or raise "
                          f"max_length")


def qa_features(tokenizer, examples: Sequence[QAExample], settings: QASettings, training: bool,
                word_spans: bool = False) -> list[dict]:
    """Windows of `[CLS] question [SEP] context-span [SEP]` over each context, `doc_stride` apart.

    Every feature keeps `example_index` and `offsets` [S, 2] (character span of each context token in
    the context; -1 for question/special tokens) to map logits back to text; with `word_spans`, also
    `word_offsets` [S, 2], the span of each context token's whole word (`word_offsets`). With `training`, the
    first gold answer gives `start_positions`/`end_positions`; a window that does not hold the whole
    answer (and an unanswerable question) points both at [CLS] (index 0), as BERT's SQuAD recipe does.
    """
    questions = [_truncate_question(tokenizer, ex.question, settings.max_query_length) for ex in examples]
    _check_windows(tokenizer, questions, settings)
    enc = tokenizer(questions, [ex.context for ex in examples], truncation="only_second",
                    max_length=settings.max_length, stride=settings.doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True)
    out = []
    for i, ex_index in enumerate(enc["overflow_to_sample_mapping"]):
        ex = examples[ex_index]
        f = encoded_arrays(enc, i)
        seq_ids = enc.sequence_ids(i)
        offsets = np.asarray([o if s == 1 else (-1, -1) for o, s in zip(enc["offset_mapping"][i], seq_ids)],
                             np.int32).reshape(-1, 2)
        f["offsets"] = offsets
        if word_spans:
            f["word_offsets"] = word_offsets(enc[i], offsets)
        f["example_index"] = np.int32(ex_index)
        if training:
            start = end = 0
            if ex.answers:
                text, char_start = ex.answers[0]
                char_end = char_start + len(text)
                context_pos = np.flatnonzero(offsets[:, 0] >= 0)
                if offsets[context_pos[0], 0] <= char_start and offsets[context_pos[-1], 1] >= char_end:
                    # first token ending after the answer start, last token starting before its end
                    start = int(context_pos[np.argmax(offsets[context_pos, 1] > char_start)])
                    end = int(context_pos[len(context_pos) - 1 - np.argmax(offsets[context_pos[::-1], 0] < char_end)])
            f["start_positions"], f["end_positions"] = np.int32(start), np.int32(end)
        out.append(f)
    return out


def word_offsets(encoding, offsets: np.ndarray) -> np.ndarray:
    """Each context token's whole-word character span, as transformers' QA pipeline widens answers
    (`align_to_words`): the tokenizer's word of the token, its characters in the context; the token's own span
    where the tokenizer has no words (as transformers falls back)."""
    out = offsets.copy()
    spans: dict[int, tuple[int, int]] = {}
    for t, word in enumerate(encoding.word_ids):
        if offsets[t, 0] < 0 or word is None:
            continue
        if word not in spans:
            try:
                spans[word] = tuple(encoding.word_to_chars(word, sequence_index=1))
            except Exception:  # noqa: BLE001 - a tokenizer without words (transformers keeps the offsets too)
                spans[word] = None
        if spans[word] is not None:
            out[t] = spans[word]
    return out


@dataclasses.dataclass
class QAPrediction:
    text: str
    score: float  # probability among the n-best candidates of the question
    start: int  # character offsets in the context; -1 for the null answer
    end: int
    null_score_diff: float  # null score minus the best span score (> threshold means "no answer")


def qa_postprocess(examples: Sequence[QAExample], features: Sequence[dict], start_logits: Sequence[np.ndarray],
                   end_logits: Sequence[np.ndarray], settings: QASettings, version_2: bool = False,
                   null_threshold: float = 0.0) -> dict[str, QAPrediction]:
    """The best span per question over all its windows: the top `n_best_size` starts x ends that lie in
    the context, end >= start, at most `max_answer_length` tokens. Its text is cut from the context by
    the character offsets (its tokens' whole words when the features have `word_offsets`). With `version_2`,
    the question is unanswerable ("") when the null score
    (min over windows of start[CLS] + end[CLS]) exceeds the best span score by more than `null_threshold`."""
    by_example = collections.defaultdict(list)
    for fi, f in enumerate(features):
        by_example[int(f["example_index"])].append(fi)
    preds = {}
    for ei, ex in enumerate(examples):
        candidates, null_score = [], np.inf
        for fi in by_example.get(ei, []):
            s_log, e_log, offsets = start_logits[fi], end_logits[fi], features[fi]["offsets"]
            chars = features[fi].get("word_offsets", offsets)
            n = len(offsets)
            s_log, e_log = s_log[:n], e_log[:n]
            null_score = min(null_score, float(s_log[0] + e_log[0]))
            starts = np.argsort(s_log)[::-1][: settings.n_best_size]
            ends = np.argsort(e_log)[::-1][: settings.n_best_size]
            for s in starts:
                for e in ends:
                    if offsets[s, 0] < 0 or offsets[e, 0] < 0 or e < s or e - s + 1 > settings.max_answer_length:
                        continue
                    candidates.append((float(s_log[s] + e_log[e]), int(chars[s, 0]), int(chars[e, 1])))
        candidates.sort(key=lambda c: -c[0])
        candidates = candidates[: settings.n_best_size]
        if not candidates:
            preds[ex.qid] = QAPrediction("", 1.0, -1, -1, float("inf"))
            continue
        scores = np.array([c[0] for c in candidates] + ([null_score] if version_2 else []))
        probs = softmax(scores)
        best_score, cs, ce = candidates[0]
        diff = null_score - best_score
        if version_2 and diff > null_threshold:
            preds[ex.qid] = QAPrediction("", float(probs[-1]), -1, -1, diff)
        else:
            preds[ex.qid] = QAPrediction(ex.context[cs:ce], float(probs[0]), cs, ce, diff)
    return preds


def _context_probabilities(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the `allowed` positions of one window (0 elsewhere)."""
    masked = np.where(allowed, logits.astype(np.float64), -np.inf)
    p = np.exp(masked - masked.max())
    return p / p.sum()


def qa_pipeline_answers(examples: Sequence[QAExample], features: Sequence[dict], start_logits: Sequence[np.ndarray],
                        end_logits: Sequence[np.ndarray], max_answer_length: int, top_k: int = 1,
                        handle_impossible_answer: bool = False, null_threshold: float = 0.0,
                        align_to_words: bool = True) -> list[list[dict]]:
    """The `top_k` answers per question as transformers' question-answering pipeline ranks them: in each window
    the start and end probabilities are softmaxes over the context tokens and [CLS]; a span scores p(start) x
    p(end) (end >= start, at most `max_answer_length` tokens). With `align_to_words` each of a window's
    2 top_k + 10 best spans is widened to its whole words (`word_offsets`), and spans that widen to the same text
    (ignoring case), in any window, add their scores: a word cut into many pieces gathers the probability of the
    spans that end inside it. `handle_impossible_answer`: "" (at 0, 0) competes with the score p([CLS]) x
    p([CLS]) of the window where it is lowest, less `null_threshold`. Each answer: {"answer", "score", "start",
    "end"} (character offsets into the context)."""
    by_example = collections.defaultdict(list)
    for fi, f in enumerate(features):
        by_example[int(f["example_index"])].append(fi)
    out = []
    for ei, ex in enumerate(examples):
        answers: dict[str, dict] = {}
        null = np.inf
        for fi in by_example.get(ei, []):
            offsets = features[fi]["offsets"]
            n = len(offsets)
            chars = features[fi]["word_offsets"] if align_to_words and "word_offsets" in features[fi] else offsets
            context = offsets[:, 0] >= 0
            allowed = context.copy()
            allowed[0] = True  # [CLS]: the null answer's position
            p_start = _context_probabilities(np.asarray(start_logits[fi])[:n], allowed)
            p_end = _context_probabilities(np.asarray(end_logits[fi])[:n], allowed)
            null = min(null, float(p_start[0] * p_end[0]))
            p_start[0] = p_end[0] = 0.0
            spans = np.tril(np.triu(np.outer(p_start, p_end)), max_answer_length - 1).ravel()  # [start * n + end]
            for i in np.argsort(-spans, kind="stable")[: 2 * top_k + 10 if align_to_words else top_k]:
                s, e = divmod(int(i), n)
                if not (context[s] and context[e]) or not spans[i]:
                    continue
                cs, ce = int(chars[s, 0]), int(chars[e, 1])
                text = ex.context[cs:ce]
                found = answers.setdefault(text.lower(), {"answer": text, "score": 0.0, "start": cs, "end": ce})
                found["score"] += float(spans[i])
        ranked = sorted(answers.values(), key=lambda a: -a["score"])
        if handle_impossible_answer and np.isfinite(null):
            ranked.append({"answer": "", "score": null, "start": 0, "end": 0})
            ranked.sort(key=lambda a: -(a["score"] - (null_threshold if not a["answer"] else 0.0)))
        out.append(ranked[:top_k] or [{"answer": "", "score": 0.0, "start": 0, "end": 0}])
    return out


# ------------------------------------------------------------------------------------------------
# Multiple choice (SWAG)
# ------------------------------------------------------------------------------------------------


def choice_features(tokenizer, examples: Sequence[ChoiceExample], max_length: int,
                    with_labels: bool = True) -> list[dict]:
    """One [C, S] feature per question: `[CLS] context [SEP] start + ' ' + ending [SEP]` for each
    ending, padded to the longest of its C rows (the batcher pads further to the bucket length)."""
    out = []
    for ex in examples:
        enc = tokenizer([ex.context] * len(ex.endings), [f"{ex.start} {e}" for e in ex.endings], truncation=True,
                        max_length=max_length)
        width = max(len(ids) for ids in enc["input_ids"])
        f = {"attention_mask": np.zeros((len(ex.endings), width), np.int32)}
        for key in ("input_ids", "token_type_ids"):  # the tokenizer may make no token types (DistilBERT's)
            if key in enc:
                f[key] = np.zeros_like(f["attention_mask"])
                for c, row in enumerate(enc[key]):
                    f[key][c, : len(row)] = row
        for c, row in enumerate(enc["input_ids"]):
            f["attention_mask"][c, : len(row)] = 1
        if with_labels:
            if ex.label is None:
                raise DataError(f"{ex.where}: the example has no label")
            f["label"] = np.int32(ex.label)
        out.append(f)
    return out
