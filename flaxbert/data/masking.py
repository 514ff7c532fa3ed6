"""Masked-LM target selection, the single implementation used by static (prepare) and dynamic (loader) masking.

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


class Masked(NamedTuple):
    input_ids: np.ndarray  # [n] the row with replacements applied
    positions: np.ndarray  # [m] sorted indices of the predicted tokens
    labels: np.ndarray  # [m] the original ids at those positions


def select_positions(tokens: np.ndarray, word_starts: np.ndarray, cfg: MaskingConfig,
                     rng: np.random.Generator) -> np.ndarray:
    """Sorted positions to predict: a `masked_lm_prob` share of the maskable tokens (whole words if asked)."""
    maskable = ~cfg.is_special[tokens]
    candidates = np.flatnonzero(maskable)
    expected = cfg.masked_lm_prob * len(candidates)
    count = int(expected) + int(rng.random() < expected - int(expected))
    count = min(count, cfg.max_predictions_per_seq, len(candidates))
    if not cfg.whole_word:
        return np.sort(rng.permutation(candidates)[:count])
    # Words: a maskable token that starts a word, or follows a special token, opens a new word.
    after_special = np.concatenate([[True], ~maskable[:-1]])
    word_of = np.cumsum((word_starts.astype(bool) | after_special) & maskable)[candidates]
    bounds = np.flatnonzero(np.diff(word_of, prepend=-1, append=-1))
    starts, sizes = bounds[:-1], np.diff(bounds)
    chosen, total = [], 0
    for w in rng.permutation(len(starts)):  # google-research/bert: skip a word that would overshoot, go on
        if total >= count:
            break
        if total + sizes[w] <= count:
            chosen.append(candidates[starts[w]:starts[w] + sizes[w]])
            total += sizes[w]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def mask_tokens(tokens: np.ndarray, word_starts: np.ndarray, cfg: MaskingConfig,
                rng: np.random.Generator) -> Masked:
    """Select positions, then replace each by [MASK] (80%), a random token (10%) or itself (10%)."""
    positions = select_positions(tokens, word_starts, cfg, rng)
    labels = tokens[positions]
    u = rng.random(len(positions))
    random_ids = cfg.replacement_ids[rng.integers(0, len(cfg.replacement_ids), len(positions))]
    replaced = np.where(u < cfg.mask_prob, cfg.mask_id,
                        np.where(u < cfg.mask_prob + cfg.random_prob, random_ids, labels))
    input_ids = tokens.copy()
    input_ids[positions] = replaced
    return Masked(input_ids, positions.astype(np.int32), labels.astype(np.int32))
