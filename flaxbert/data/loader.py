"""The pretraining loader: prepared shards -> grain pipeline -> host-local numpy batches (docs/CONTRACTS.md).

Order is a pure function of (seed, process_index, process_count): a grain `MapDataset` over all instances is
sharded by process (process i of n reads instances i, i+n, ...), shuffled with a new permutation every epoch,
masked (static: the masks written by prepare; dynamic: drawn from the seed and the element's position, so every
epoch gets new masks), optionally packed, and batched. `get_state()` / `set_state()` use grain's iterator state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from flaxbert.data.corpus import DataError
from flaxbert.data.masking import mask_tokens
from flaxbert.data.shards import SHARD_ARRAYS, masking_config, load_manifest

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
              "masked_lm_weights", "next_sentence_labels")
PACKED_KEYS = BATCH_KEYS + ("instance_ids", "position_ids", "next_sentence_weights", "cls_positions")


class PreparedSource:
    """grain random-access source over the shards of a prepared directory; records are dicts of arrays."""

    def __init__(self, prepared_dir: str | os.PathLike):
        self.dir = Path(prepared_dir)
        self.manifest = load_manifest(self.dir)
        sizes = [s["instances"] for s in self.manifest["shards"]]
        self._ends = np.cumsum(sizes)
        self._shards: list[dict[str, np.ndarray]] | None = None

    def _open(self) -> list[dict[str, np.ndarray]]:
        if self._shards is None:  # built whole, then published: prefetch threads may race here
            shards = []
            for shard in self.manifest["shards"]:
                try:
                    shards.append({name: np.load(self.dir / shard["name"] / f"{name}.npy", mmap_mode="r")
                                   for name in SHARD_ARRAYS})
                except FileNotFoundError as e:
                    raise DataError(f"{e.filename}: missing; the prepared directory is incomplete") from None
            self._shards = shards
        return self._shards

    def __getstate__(self):  # memory maps are reopened in each worker process
        return {**self.__dict__, "_shards": None}

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index) % len(self)  # grain may pass indices of later epochs
        k = int(np.searchsorted(self._ends, index, side="right"))
        i = index - (int(self._ends[k - 1]) if k else 0)
        a = self._open()[k]
        lo, hi = a["offsets"][i], a["offsets"][i + 1]
        mlo, mhi = a["mask_offsets"][i], a["mask_offsets"][i + 1]
        return {"index": index, "tokens": np.asarray(a["tokens"][lo:hi], np.int32),
                "word_starts": np.asarray(a["word_starts"][lo:hi]), "a_length": int(a["a_lengths"][i]),
                "is_random_next": int(a["is_random_next"][i]), "target_length": int(a["target_lengths"][i]),
                "mask_positions": np.asarray(a["mask_positions"][mlo:mhi], np.int32),
                "mask_inputs": np.asarray(a["mask_inputs"][mlo:mhi], np.int32)}

    def __repr__(self) -> str:
        return f"PreparedSource({self.dir})"


def instance_features(record: dict, masked_input: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """One instance as variable-length arrays (the unit that padding and packing work on)."""
    tokens = record["tokens"]
    token_types = np.zeros(len(tokens), np.int32)
    token_types[record["a_length"] + 2:] = 1
    return {"input_ids": masked_input.astype(np.int32), "token_type_ids": token_types,
            "masked_lm_positions": positions.astype(np.int32), "masked_lm_ids": tokens[positions].astype(np.int32),
            "next_sentence_labels": np.array([record["is_random_next"]], np.int32)}


def static_features(record: dict) -> dict[str, np.ndarray]:
    masked = record["tokens"].copy()
    masked[record["mask_positions"]] = record["mask_inputs"]
    return instance_features(record, masked, record["mask_positions"])


class _DynamicMask:
    """grain RandomMap: draws new masks from the element's rng (seeded by seed and position, so per epoch)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        masked = mask_tokens(record["tokens"], record["word_starts"], self.cfg, rng)
        return instance_features(record, masked.input_ids, masked.positions)


def pad(array: np.ndarray, length: int, value: int = 0) -> np.ndarray:
    """Right-pad a 1-D array to `length` (the only padding in the data layer)."""
    return np.concatenate([array, np.full(length - len(array), value, array.dtype)])


def padded_row(features: dict[str, np.ndarray], seq_len: int, max_predictions: int) -> dict[str, np.ndarray]:
    """An unpacked row in the batch contract: fixed [S] / [P] shapes, weights and attention mask."""
    n, m = len(features["input_ids"]), len(features["masked_lm_positions"])
    return {"input_ids": pad(features["input_ids"], seq_len),
            "token_type_ids": pad(features["token_type_ids"], seq_len),
            "attention_mask": pad(np.ones(n, np.int32), seq_len),
            "masked_lm_positions": pad(features["masked_lm_positions"], max_predictions),
            "masked_lm_ids": pad(features["masked_lm_ids"], max_predictions),
            "masked_lm_weights": pad(np.ones(m, np.float32), max_predictions),
            "next_sentence_labels": features["next_sentence_labels"][0]}


def _mixed_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Loader:
    """Iterator of batch dicts with `get_state()` / `set_state()`; `manifest` describes the prepared data."""

    def __init__(self, dataset, manifest: dict, settings: dict):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self.manifest = manifest
        self.settings = settings

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        """A small JSON-serialisable dict; `set_state` on a loader built with the same settings resumes exactly."""
        return {"settings": self.settings, "iterator": json.loads(json.dumps(self._iterator.get_state()))}

    def set_state(self, state: dict) -> None:
        if state.get("settings") != self.settings:
            diff = {k: (v, self.settings.get(k)) for k, v in state.get("settings", {}).items()
                    if self.settings.get(k) != v}
            raise DataError(f"loader state was saved with other settings (saved, now): {diff}")
        self._iterator.set_state(state["iterator"])


def make_loader(prepared_dir: str | os.PathLike, *, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                masking: str = "static", packed: bool = False, max_instances_per_row: int = 8,
                packing_bins: int | None = None, drop_remainder: bool = True, prefetch_threads: int = 2,
                prefetch_buffer_size: int | None = None) -> Loader:
    """Batches of `batch_size` rows (per process) from a prepared directory, per docs/CONTRACTS.md.

    `num_epochs=None` repeats forever (batches then run across epoch boundaries). Each process reads
    `len // process_count` instances (the remainder, under `process_count` instances, is left out so every
    process yields the same number of batches). `packed=True` first-fit packs up to `max_instances_per_row`
    instances into each row (grain `FirstFitPackIterDataset`). Reading, masking and padding run in
    `prefetch_threads` grain threads. (grain's `mp_prefetch` is not offered: with grain 0.2.18 its batches
    depend on the worker count and its restored state did not resume exactly in our test.)
    """
    import grain

    if masking not in ("static", "dynamic"):
        raise DataError(f"masking must be 'static' or 'dynamic', got {masking!r}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside [0, {process_count})")
    source = PreparedSource(prepared_dir)
    manifest = source.manifest
    seq_len, max_pred = manifest["max_seq_length"], manifest["max_predictions_per_seq"]
    per_process = len(source) // process_count
    if per_process < (1 if packed else batch_size) and drop_remainder:
        raise DataError(f"{prepared_dir}: {len(source)} instances give each of {process_count} processes "
                        f"{per_process}, fewer than one batch of {batch_size}")
    ds = grain.MapDataset.source(source)[process_index:per_process * process_count:process_count]
    if shuffle:
        ds = ds.shuffle(seed=_mixed_seed(seed, 1))
    ds = ds.repeat(num_epochs)
    if masking == "static":
        ds = ds.map(static_features)
    else:
        cfg = masking_config(manifest, np.load(Path(prepared_dir) / "replacement_ids.npy"))
        ds = ds.random_map(_DynamicMask(cfg), seed=_mixed_seed(seed, 2, process_index))
    options = grain.ReadOptions(num_threads=prefetch_threads,
                                prefetch_buffer_size=prefetch_buffer_size or 4 * batch_size)
    if packed:
        from flaxbert.data.packing import pack, packed_batch

        it = pack(ds.to_iter_dataset(options), seq_len=seq_len, max_predictions=max_pred,
                  max_instances=max_instances_per_row, num_bins=packing_bins or max(batch_size, 8),
                  seed=_mixed_seed(seed, 3))
        it = it.batch(batch_size, drop_remainder=drop_remainder).map(packed_batch)
    else:
        it = ds.map(functools.partial(padded_row, seq_len=seq_len, max_predictions=max_pred)).to_iter_dataset(options)
        it = it.batch(batch_size, drop_remainder=drop_remainder)
    prepared_id = hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "throughput"},
                                            sort_keys=True).encode()).hexdigest()[:16]
    settings = {"prepared": prepared_id, "batch_size": batch_size,
                "seed": seed, "shuffle": shuffle, "num_epochs": num_epochs, "process_index": process_index,
                "process_count": process_count, "masking": masking, "packed": packed,
                "max_instances_per_row": max_instances_per_row, "packing_bins": packing_bins,
                "drop_remainder": drop_remainder}
    return Loader(it, manifest, settings)
