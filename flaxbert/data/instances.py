"""Tokenised corpora and NSP sentence-pair instances, following google-research/bert's create_pretraining_data.

An instance is `[CLS] A [SEP] B [SEP]`. Changes from the original, each for a measured reason:
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

import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np


@dataclass
class TokenizedCorpus:
    """Token ids of every sentence, flat: sentence s is tokens[sentence_offsets[s]:sentence_offsets[s+1]];
    document d is sentences doc_offsets[d]..doc_offsets[d+1]. word_starts marks tokens that begin a word."""

    tokens: np.ndarray  # [T] int32
    word_starts: np.ndarray  # [T] uint8
    sentence_offsets: np.ndarray  # [num_sentences + 1] int64
    doc_offsets: np.ndarray  # [num_docs + 1] int64

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def sentence(self, s: int) -> tuple[int, int]:
        return int(self.sentence_offsets[s]), int(self.sentence_offsets[s + 1])

    def doc_sentences(self, d: int) -> range:
        return range(int(self.doc_offsets[d]), int(self.doc_offsets[d + 1]))

    def save(self, directory) -> None:
        for name in ("tokens", "word_starts", "sentence_offsets", "doc_offsets"):
            np.save(f"{directory}/{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, directory) -> "TokenizedCorpus":
        """Tokens memory-mapped; offsets in memory (they are indexed per sentence, where maps are slow)."""
        return cls(np.load(f"{directory}/tokens.npy", mmap_mode="r"),
                   np.load(f"{directory}/word_starts.npy", mmap_mode="r"),
                   np.load(f"{directory}/sentence_offsets.npy"), np.load(f"{directory}/doc_offsets.npy"))


def tokenize_sentences(backend, sentences: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Ids and word-start flags per sentence, without special tokens (`backend` is a `tokenizers.Tokenizer`)."""
    ids, starts = [], []
    for enc in backend.encode_batch(list(sentences), add_special_tokens=False):
        words = np.array([-1 if w is None else w for w in enc.word_ids], np.int64)
        ids.append(np.asarray(enc.ids, np.int32))
        starts.append((np.diff(words, prepend=-2) != 0).astype(np.uint8))
    return ids, starts


@dataclass(frozen=True)
class InstanceConfig:
    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    random_next_prob: float = 0.5


class Instance(NamedTuple):
    tokens: np.ndarray  # [n] int32, [CLS] A [SEP] B [SEP]
    word_starts: np.ndarray  # [n] uint8
    a_length: int  # tokens in A (without specials)
    is_random_next: bool
    target_length: int  # the length target drawn for this instance (max_seq_length - 3 unless short)


def _gather(corpus: TokenizedCorpus, sentences: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    spans = [corpus.sentence(s) for s in sentences]
    return (np.concatenate([corpus.tokens[a:b] for a, b in spans]),
            np.concatenate([corpus.word_starts[a:b] for a, b in spans]))


def _truncate_pair(len_a: int, len_b: int, max_tokens: int, rng: random.Random) -> tuple[slice, slice]:
    """Trim the longer segment one token at a time, from the front or the back at random."""
    a0, a1, b0, b1 = 0, len_a, 0, len_b
    while (a1 - a0) + (b1 - b0) > max_tokens:
        if a1 - a0 >= b1 - b0:
            if rng.random() < 0.5:
                a0 += 1
            else:
                a1 -= 1
        elif rng.random() < 0.5:
            b0 += 1
        else:
            b1 -= 1
    return slice(a0, a1), slice(b0, b1)


def _build(corpus, a_sents, b_sents, cfg, rng, cls_id, sep_id, is_random_next, target) -> Instance:
    a_tok, a_ws = _gather(corpus, a_sents)
    b_tok, b_ws = _gather(corpus, b_sents)
    sa, sb = _truncate_pair(len(a_tok), len(b_tok), target, rng)
    a_tok, a_ws, b_tok, b_ws = a_tok[sa], a_ws[sa].copy(), b_tok[sb], b_ws[sb].copy()
    a_ws[:1] = b_ws[:1] = 1
    cls, sep, one = np.array([cls_id], np.int32), np.array([sep_id], np.int32), np.ones(1, np.uint8)
    tokens = np.concatenate([cls, a_tok, sep, b_tok, sep])
    starts = np.concatenate([one, a_ws, one, b_ws, one])
    return Instance(tokens, starts, len(a_tok), is_random_next, target)


def document_instances(corpus: TokenizedCorpus, doc: int, cfg: InstanceConfig, rng: random.Random,
                       cls_id: int, sep_id: int) -> list[Instance]:
    """All instances whose A segment comes from document `doc` (one pass, as one dupe_factor round)."""
    max_tokens = cfg.max_seq_length - 3
    sentences = corpus.doc_sentences(doc)
    instances, chunk, length, target = [], [], 0, max_tokens
    i = 0
    while i < len(sentences):
        if not chunk:
            target = rng.randint(2, max_tokens) if rng.random() < cfg.short_seq_prob else max_tokens
        chunk.append(sentences[i])
        a, b = corpus.sentence(sentences[i])
        length += b - a
        if i == len(sentences) - 1 or length >= target:
            random_next = rng.random() < cfg.random_next_prob
            if not random_next and len(chunk) == 1:
                if i + 1 < len(sentences):
                    i += 1
                    chunk.append(sentences[i])
                else:
                    random_next = True
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a_sents = chunk[:a_end]
            if random_next:
                a_len = sum(corpus.sentence(s)[1] - corpus.sentence(s)[0] for s in a_sents)
                other = doc
                for _ in range(10):
                    other = rng.randint(0, corpus.num_docs - 1)
                    if other != doc:
                        break
                pool = corpus.doc_sentences(other)
                b_sents, b_len = [], 0
                for s in pool[rng.randint(0, len(pool) - 1):]:
                    b_sents.append(s)
                    b_len += corpus.sentence(s)[1] - corpus.sentence(s)[0]
                    if b_len >= target - a_len:
                        break
                i -= len(chunk) - a_end  # the unused sentences of the chunk start the next instance
            else:
                b_sents = chunk[a_end:]
            instances.append(_build(corpus, a_sents, b_sents, cfg, rng, cls_id, sep_id, random_next, target))
            chunk, length = [], 0
        i += 1
    return instances
