"""Tokenised corpora and NSP sentence-pair instances, following google-research/bert's create_pretraining_data.

An instance is `[CLS] A [SEP] B [SEP]`, or with `nsp=False` (MLM only, as RoBERTa and Cramming train)
`[CLS] A [SEP]` where A is a contiguous run of a document's tokens that crosses sentence boundaries. Changes from the original, each for a measured reason:
- the short target length (`short_seq_prob`) is drawn per instance, not once per document, so the share of
  short-target instances is `short_seq_prob` whatever the document lengths, and it is a hard limit: A + B are
  truncated to it. (The original only truncates to max_seq_length - 3; whole sentences overshoot a small
  target, so on WikiText-2 its "short" rows had a median of ~100 of 125 tokens.);
- the 50% "random next" coin is tossed before looking at the chunk: when it says "actual next" and the chunk
  holds a single sentence, the document's next sentence is taken as B (the original forces "random next" there,
  which pushes the random share well above 50% on corpora of long sentences). Only a document's last lone
  sentence still gets a forced random B;
- a word cut by front truncation still counts as a word for whole-word masking.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np


@dataclass
class TokenizedCorpus:
    """Token ids of every sentence, flat: sentence s is tokens[sentence_offsets[s]:sentence_offsets[s+1]];
    document d is sentences doc_offsets[d]..doc_offsets[d+1]. word_starts marks tokens that begin a word."""

    tokens: np.ndarray  # [T] int32 or uint16
    word_starts: np.ndarray  # [T] uint8
    sentence_offsets: np.ndarray  # [num_sentences + 1] int64
    doc_offsets: np.ndarray  # [num_docs + 1] int64

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def sentence(self, s: int) -> tuple[int, int]:
        return int(self.sentence_offsets[s]), int(self.sentence_offsets[s + 1])


class Tokenized(NamedTuple):
    tokens: np.ndarray  # [T] every sentence's ids, flat
    word_starts: np.ndarray  # [T] uint8, 1 where a token begins a word
    lengths: np.ndarray  # [num_sentences] int64 tokens per sentence (0 for one that tokenises to nothing)


def continuation_ids(backend) -> np.ndarray | None:
    """[vocab] bool: ids that continue a word, for a WordPiece model behind BERT's pre-tokeniser, else None.

    There a token starts a word exactly when it lacks the "##" prefix (the pre-tokeniser splits every
    punctuation character off, so no word's first piece can start with "##"), which lets `tokenize_sentences`
    use the faster encoding without word ids (offsets are not computed)."""
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "WordPiece" or pre.get("type") != "BertPreTokenizer":
        return None
    prefix = model.get("continuing_subword_prefix") or "##"
    vocab = backend.get_vocab(with_added_tokens=True)
    table = np.zeros(max(vocab.values()) + 1, bool)
    table[[i for t, i in vocab.items() if t.startswith(prefix)]] = True
    return table


def tokenize_sentences(backend, sentences: Sequence[str], dtype=np.int32,
                       continuation: np.ndarray | None = None) -> Tokenized:
    """Ids and word-start flags of a batch of sentences, without special tokens (`backend`: a
    `tokenizers.Tokenizer`; `continuation`: its `continuation_ids`, when it has them). One flat array per field:
    converting per sentence cost more than the encoding."""
    sentences = list(sentences)
    if continuation is not None:
        encodings = backend.encode_batch_fast(sentences, add_special_tokens=False)
    else:
        encodings = backend.encode_batch(sentences, add_special_tokens=False)
    lengths = np.fromiter(map(len, encodings), np.int64, len(encodings))
    total = int(lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype, total)
    if continuation is not None:
        starts = (~continuation[tokens]).astype(np.uint8)
    else:
        words = np.array(list(itertools.chain.from_iterable(e.word_ids for e in encodings)), np.float64)
        words = np.nan_to_num(words, nan=-1.0)  # tokens of no word (None) form one run, as they did per sentence
        starts = np.ones(total, np.uint8)
        starts[1:] = words[1:] != words[:-1]
    starts[(np.cumsum(lengths) - lengths)[lengths > 0]] = 1  # word ids restart with every sentence
    return Tokenized(tokens, starts, lengths)


@dataclass(frozen=True)
class InstanceConfig:
    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    random_next_prob: float = 0.5
    nsp: bool = True  # sentence pairs with a random-next label; False: single segments for MLM only


class Instance(NamedTuple):
    tokens: np.ndarray  # [n] int32, [CLS] A [SEP] B [SEP]
    word_starts: np.ndarray  # [n] uint8
    a_length: int  # tokens in A (without specials)
    is_random_next: bool
    target_length: int  # the length target drawn for this instance (max_seq_length - 3 unless short)


# An instance is recorded as a span row: A and B are each one contiguous run of corpus tokens (sentences of a
# document are contiguous, and truncation only cuts the ends), so the tokens are gathered later for many
# instances at once (`assemble`).
SPAN_FIELDS = ("a_start", "a_length", "b_start", "b_length", "is_random_next", "target_length")


def truncate_pair(len_a: int, len_b: int, max_tokens: int, rng: random.Random) -> tuple[int, int, int, int]:
    """google-research/bert's truncation (trim the longer segment one token at a time, from the front or the
    back at random) in O(1): the final lengths do not depend on the coins, and the front cuts of a segment
    trimmed k times are Binomial(k, 1/2). Returns (front cut of A, new len A, front cut of B, new len B)."""
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return 0, len_a, 0, len_b
    if len_a - excess >= len_b - 1:  # only A is trimmed (ties trim A)
        new_a, new_b = len_a - excess, len_b
    elif len_b - excess >= len_a:
        new_a, new_b = len_a, len_b - excess
    else:  # both: the longer down to the shorter, then alternately, A first
        new_a, new_b = max_tokens // 2, max_tokens - max_tokens // 2
    front_a = rng.getrandbits(len_a - new_a).bit_count()
    front_b = rng.getrandbits(len_b - new_b).bit_count()
    return front_a, new_a, front_b, new_b


def _random_next(corpus: TokenizedCorpus, doc: int, need: int, rng: random.Random) -> tuple[int, int]:
    """Token span of a random B: sentences of another document from a random one on, until `need` tokens."""
    other = doc
    for _ in range(10):
        other = rng.randint(0, corpus.num_docs - 1)
        if other != doc:
            break
    first, last = int(corpus.doc_offsets[other]), int(corpus.doc_offsets[other + 1])
    start = first + rng.randint(0, last - first - 1)
    begin = int(corpus.sentence_offsets[start])
    # whole sentences until B holds `need` tokens (at least one sentence, at most the document's end)
    end = int(np.searchsorted(corpus.sentence_offsets, begin + need))
    end = min(max(end, start + 1), last)
    return begin, int(corpus.sentence_offsets[end])


def document_spans(corpus: TokenizedCorpus, doc: int, cfg: InstanceConfig, rng: random.Random,
                   out: list) -> None:
    """Append a span row (SPAN_FIELDS) to `out` for every instance whose A segment comes from document `doc`
    (one pass, as one dupe_factor round)."""
    if not cfg.nsp:
        _single_segment_spans(corpus, doc, cfg, rng, out)
        return
    max_tokens = cfg.max_seq_length - 3
    first, last = int(corpus.doc_offsets[doc]), int(corpus.doc_offsets[doc + 1])
    off = corpus.sentence_offsets[first:last + 1].tolist()  # Python ints: indexed per sentence below
    n = last - first
    c = i = 0  # the chunk is sentences c..i of the document
    target = max_tokens
    while i < n:
        if i == c:
            target = rng.randint(2, max_tokens) if rng.random() < cfg.short_seq_prob else max_tokens
        if i == n - 1 or off[i + 1] - off[c] >= target:
            random_next = rng.random() < cfg.random_next_prob
            if not random_next and i == c:
                if i + 1 < n:
                    i += 1
                else:
                    random_next = True
            a_end = c + (rng.randint(1, i - c) if i > c else 1)
            if random_next:
                b_begin, b_end = _random_next(corpus, doc, target - (off[a_end] - off[c]), rng)
                i = a_end - 1  # the unused sentences of the chunk start the next instance
            else:
                b_begin, b_end = off[a_end], off[i + 1]
            cut_a, len_a, cut_b, len_b = truncate_pair(off[a_end] - off[c], b_end - b_begin, target, rng)
            out.append((off[c] + cut_a, len_a, b_begin + cut_b, len_b, random_next, target))
            c = i + 1
        i += 1


def _single_segment_spans(corpus: TokenizedCorpus, doc: int, cfg: InstanceConfig, rng: random.Random,
                          out: list) -> None:
    """MLM-only rows: the document's tokens cut into consecutive runs of the length target (max_seq_length - 2,
    or with `short_seq_prob` a random one), whatever the sentence boundaries; B is empty."""
    max_tokens = cfg.max_seq_length - 2
    begin = int(corpus.sentence_offsets[int(corpus.doc_offsets[doc])])
    end = int(corpus.sentence_offsets[int(corpus.doc_offsets[doc + 1])])
    while begin < end:
        target = rng.randint(2, max_tokens) if rng.random() < cfg.short_seq_prob else max_tokens
        length = min(target, end - begin)
        out.append((begin, length, begin + length, 0, False, target))
        begin += length


class Assembled(NamedTuple):
    tokens: np.ndarray  # [sum of lengths] every instance's [CLS] A [SEP] B [SEP], flat
    word_starts: np.ndarray  # [sum of lengths] uint8
    offsets: np.ndarray  # [num_instances + 1] int64


def assemble(corpus: TokenizedCorpus, spans: np.ndarray, cls_id: int, sep_id: int, pair: bool = True) -> Assembled:
    """The tokens of many instances at once from their span rows [N, len(SPAN_FIELDS)]: one gather.
    `pair=False`: single segments `[CLS] A [SEP]` (B is empty)."""
    a_start, a_len, b_start, b_len = (spans[:, k].astype(np.int64) for k in range(4))
    lengths = a_len + b_len + (3 if pair else 2)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)  # position in the instance
    a_len_t, b_end_t = np.repeat(a_len, lengths), np.repeat(a_len + b_len + 2, lengths)
    in_a = (pos >= 1) & (pos <= a_len_t)
    in_b = (pos >= a_len_t + 2) & (pos < b_end_t)
    source = np.where(in_a, np.repeat(a_start - 1, lengths) + pos, np.repeat(b_start - a_len - 2, lengths) + pos)
    special = ~(in_a | in_b)
    source[special] = 0
    tokens = corpus.tokens[source].astype(np.int32)
    tokens[special] = sep_id
    tokens[offsets[:-1]] = cls_id
    word_starts = corpus.word_starts[source]
    # a word cut by front truncation still starts one: A and B never continue a word across [CLS]/[SEP]
    word_starts[special | (pos == 1) | (pos == a_len_t + 2)] = 1
    return Assembled(tokens, word_starts, offsets)


def document_instances(corpus: TokenizedCorpus, doc: int, cfg: InstanceConfig, rng: random.Random,
                       cls_id: int, sep_id: int) -> list[Instance]:
    """All instances whose A segment comes from document `doc` (one pass, as one dupe_factor round)."""
    rows: list = []
    document_spans(corpus, doc, cfg, rng, rows)
    if not rows:
        return []
    spans = np.array(rows, np.int64)
    built = assemble(corpus, spans, cls_id, sep_id, pair=cfg.nsp)
    return [Instance(built.tokens[a:b], built.word_starts[a:b], int(row[1]), bool(row[4]), int(row[5]))
            for a, b, row in zip(built.offsets[:-1], built.offsets[1:], spans)]
