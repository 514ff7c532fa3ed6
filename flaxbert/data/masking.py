"""Masked-LM target selection over whole batches, the one implementation behind static (prepare) and dynamic
(loader) masking.

google-research/bert semantics with three documented changes: the number of predictions is
`masked_lm_prob` x the *maskable* tokens (specials excluded) with stochastic rounding, so the expected share is
exactly `masked_lm_prob` for every row length (the original rounds `prob x len(tokens incl. specials)` and masks
at least one token); random replacements are drawn from the non-special vocabulary (the original may insert
[CLS], [PAD] or [unusedN]); and with whole-word masking the first token after [CLS]/[SEP] always starts a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class MaskingConfig:
    mask_id: int
    is_special: np.ndarray  # [vocab] bool: never masked (and never used as random replacements)
    replacement_ids: np.ndarray  # ids a "random token" replacement draws from
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word: bool = False
    mask_prob: float = 0.8  # of the selected tokens: replaced by [MASK] ...
    random_prob: float = 0.1  # ... by a random token; the rest (0.1) are left unchanged


# Random numbers come from a counter-based generator: the draws of a row are a pure function of (key, row id), so
# a row gets the same masks whichever process, thread or batch computes it, and resuming needs no generator state.
_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele, Lea and Flood 2014): a bijection of uint64 with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """A 128-bit key from integers (seed, purpose, ...), for `uniform` and numpy generators."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)
    return int(words[0]) | int(words[1]) << 64


def uniform(key: int, rows: np.ndarray, width: int) -> np.ndarray:
    """[len(rows), width] float32 draws in [0, 1) with 32 random bits each (two per 64-bit hash): draw (r, c)
    depends only on (key, rows[r], c)."""
    words = (width + 1) // 2
    counter = np.asarray(rows, np.uint64)[:, None] * np.uint64(words) + np.arange(words, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix64(_mix64(counter * _GOLDEN + np.uint64(key % 2**64)) ^ np.uint64((key >> 64) % 2**64))
    bits = z.view(np.uint32).reshape(len(counter), 2 * words)[:, :width]
    return (bits >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 2**24)


class BatchMasked(NamedTuple):
    input_ids: np.ndarray  # [B, S] the rows with replacements applied
    positions: np.ndarray  # [B, P] sorted predicted positions, then 0-padding
    labels: np.ndarray  # [B, P] the original ids there (0 in padding slots)
    weights: np.ndarray  # [B, P] float32, 1 for a prediction


def compact(mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The True entries of each row of `mask` [B, N], in order, moved to slots 0, 1, ... of a [B, width] array:
    (row, column, slot) index arrays of those that fit."""
    rows, cols = np.nonzero(mask)
    slots = np.cumsum(mask, axis=1)[rows, cols] - 1
    keep = slots < width
    return rows[keep], cols[keep], slots[keep]


def place(tokens: np.ndarray, rows: np.ndarray, slots: np.ndarray, positions: np.ndarray, inputs: np.ndarray,
          width: int) -> BatchMasked:
    """Predictions given one entry each (row, slot in the row's `width` prediction slots, position in the row,
    the input id written there) -> the batch arrays; labels are the tokens the inputs replace."""
    out_positions = np.zeros((len(tokens), width), np.int32)
    out_positions[rows, slots] = positions
    weights = np.zeros((len(tokens), width), np.float32)
    weights[rows, slots] = 1.0
    labels = np.zeros((len(tokens), width), np.int32)
    labels[rows, slots] = tokens[rows, positions]
    input_ids = tokens.copy()
    input_ids[rows, positions] = inputs
    return BatchMasked(input_ids, out_positions, labels, weights)


def _whole_word_selection(maskable: np.ndarray, word_starts: np.ndarray, keys: np.ndarray,
                          count: np.ndarray) -> np.ndarray:
    """[B, S] bool: whole words taken in random order, skipping a word that would overshoot `count`
    (google-research/bert), and going on with the words after it."""
    B, S = maskable.shape
    opens = maskable & word_starts.astype(bool)  # a word opens at a word start or after a special / padding
    opens[:, 0] = maskable[:, 0]
    opens[:, 1:] |= maskable[:, 1:] & ~maskable[:, :-1]
    # every token's word opener as a flat index; a row's first maskable token always opens a word, so a running
    # maximum over the flattened batch never carries an opener into the next row's maskable tokens
    index_type = np.int32 if B * S < 2**31 else np.int64
    flat_start = np.maximum.accumulate(np.arange(B * S, dtype=index_type) * opens.ravel())
    sizes = np.bincount(flat_start[maskable.ravel()], minlength=B * S)  # word size at its opener's flat index
    # openers in the order of their keys (24-bit integers), then the other columns: one sort of packed
    # (non-opener bit, key, column) words per row
    shift = max(1, (S - 1).bit_length())
    word = np.uint32 if 25 + shift <= 32 else np.uint64
    packed = (keys * np.float32(2**24)).astype(word)
    packed |= (~opens).astype(word) << word(24)
    packed <<= word(shift)
    packed |= np.arange(S, dtype=word)
    packed.sort(axis=1)
    order = (packed & word((1 << shift) - 1)).astype(np.intp)
    order += (np.arange(B) * S)[:, None]  # flat openers in key order
    chosen = np.zeros(B * S, bool)
    first_words = int(count.max(initial=0))  # no row takes more words than its count
    if first_words == 0:
        return chosen.reshape(B, S)
    head = order[:, :first_words]
    cumulative = np.cumsum(sizes[head], axis=1)
    taken = (cumulative <= count[:, None]) & (sizes[head] > 0)  # the words before the first that overshoots
    chosen[head[taken]] = True
    last = taken.sum(axis=1)  # index of the first overshooting word: later, smaller words may still fit
    total = np.where(last > 0, cumulative[np.arange(B), np.maximum(last - 1, 0)], 0)
    short = np.flatnonzero(total < count)
    if len(short):
        _catch_up(chosen, order[short], sizes[order[short]], (count - total)[short], last[short])
    return maskable & chosen[flat_start].reshape(B, S)


def _catch_up(chosen: np.ndarray, order: np.ndarray, sizes: np.ndarray, left: np.ndarray, last: np.ndarray) -> None:
    """For rows still `left` tokens short after their first overshooting word (column `last` of `order`): take,
    in key order, each later word that still fits, marking its opener in `chosen`."""
    col = np.arange(order.shape[1])
    rows = np.arange(len(order))
    while len(rows):
        fits = (sizes[rows] > 0) & (sizes[rows] <= left[rows, None]) & (col > last[rows, None])
        found = fits.any(axis=1)
        rows = rows[found]
        first = np.argmax(fits[found], axis=1)
        chosen[order[rows, first]] = True
        left[rows] -= sizes[rows, first]
        last[rows] = first
        rows = rows[left[rows] > 0]


def mask_batch(tokens: np.ndarray, valid: np.ndarray, word_starts: np.ndarray | None, cfg: MaskingConfig,
               key: int, rows: np.ndarray) -> BatchMasked:
    """Masks for a padded batch [B, S] at once: a `masked_lm_prob` share of each row's maskable tokens
    (stochastic rounding, at most `max_predictions_per_seq`), whole words if `cfg.whole_word`, then 80/10/10.

    `valid` [B, S] marks real tokens; `rows` [B] are the rows' ids for the counter-based generator."""
    B, S = tokens.shape
    P = cfg.max_predictions_per_seq
    u = uniform(key, rows, S + 1 + 2 * P)
    select_keys, u_round, u_kind, u_id = u[:, :S], u[:, S], u[:, S + 1:S + 1 + P], u[:, S + 1 + P:]
    maskable = valid & ~cfg.is_special[tokens]
    candidates = maskable.sum(axis=1)
    expected = cfg.masked_lm_prob * candidates
    count = np.minimum(np.floor(expected).astype(np.int64) + (u_round < expected - np.floor(expected)),
                       np.minimum(P, candidates))
    if cfg.whole_word:
        selected = _whole_word_selection(maskable, word_starts, select_keys, count)
    else:  # the `count` smallest keys among the maskable tokens
        keys = np.where(maskable, select_keys, np.float32(2.0))
        smallest = np.sort(np.partition(keys, P - 1, axis=1)[:, :P] if P < S else keys, axis=1)
        threshold = np.take_along_axis(smallest, np.maximum(count - 1, 0)[:, None], axis=1)
        selected = (keys <= threshold) & (count > 0)[:, None]
    b, c, slot = compact(selected, P)
    kind, labels = u_kind[b, slot], tokens[b, c]
    random_ids = cfg.replacement_ids[np.minimum((u_id[b, slot] * len(cfg.replacement_ids)).astype(np.int64),
                                                len(cfg.replacement_ids) - 1)]
    replaced = np.where(kind < cfg.mask_prob, cfg.mask_id,
                        np.where(kind < cfg.mask_prob + cfg.random_prob, random_ids, labels))
    return place(tokens, b, slot, c, replaced, P)
