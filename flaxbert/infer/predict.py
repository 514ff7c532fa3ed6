"""A head's jitted forward pass and running it over features in length buckets, outputs cut back per feature."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from flaxbert.heads import apply_head
from flaxbert.infer import batching
from flaxbert.model import ENCODER_KEYS


def make_forward(config, head: str) -> Callable:
    """A jitted deterministic forward pass returning the head's logits as a tuple of arrays (parameters a head
    hands its loss, such as the CRF's scores, are not per-row outputs and are left out)."""
    @jax.jit
    def forward(params, batch):
        return tuple(x for x in apply_head(params, batch, config, head=head) if isinstance(x, jax.Array))
    return forward


@dataclasses.dataclass
class Outputs:
    """Per-feature model outputs (numpy, cut to the feature's own length) and throughput."""
    rows: list[tuple[np.ndarray, ...]]
    real_tokens: int
    seconds: float


def run_model(forward: Callable, params, features: Sequence[dict], batch_size: int, boundaries: Sequence[int],
              seq_outputs: bool, progress: bool = False, desc: str = "eval") -> Outputs:
    """Outputs per feature. `seq_outputs`: the head's outputs have a sequence axis (token and span
    logits), which is cut back from the bucket length to the feature's length."""
    rows: list = [None] * len(features)
    n_batches = batching.num_batches(features, batch_size, boundaries)
    batches = batching.make_batches(features, batch_size, boundaries)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=n_batches, desc=desc, leave=False)
    tokens, start = 0, time.perf_counter()
    for batch in batches:
        inputs = {k: batch[k] for k in ENCODER_KEYS if k in batch}
        out = [np.asarray(x) for x in jax.device_get(forward(params, inputs))]
        tokens += batching.real_tokens(batch)
        for row, idx in enumerate(batch["index"]):
            if idx < 0:
                continue
            n = features[idx]["input_ids"].shape[-1]
            rows[idx] = tuple(o[row, :n] if seq_outputs else o[row] for o in out)
    return Outputs(rows, tokens, time.perf_counter() - start)
