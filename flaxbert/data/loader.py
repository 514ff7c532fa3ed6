"""The pretraining loader: prepared shards -> host-local numpy batches (docs/CONTRACTS.md), a whole batch at a time.

A batch is made by array operations over the batch: the instances' tokens are gathered from the memory-mapped
shards with one index matrix, masks are applied (static) or drawn (dynamic, `masking.mask_batch`) for all rows
at once, and packed rows follow a plan made once from the length histogram (`packing`).

Order is a function of the seed alone. The stream of units (instances, or packed rows) is every epoch's
permutation of them, one after the other; global batch g is stream positions [g*G, (g+1)*G) with
G = batch_size * process_count, and process i takes rows [i*batch_size, (i+1)*batch_size) of it, which is how
`sharding.to_global` assembles a global batch. A job of 1, 2 or 8 processes thus trains on the same global
batches, and the loader state is the index of the next global batch: it resumes on a slice of another size.
Dynamic masks are drawn from (seed, stream position), so they are new every epoch and the same whichever
process makes the row. Batches are made ahead in worker threads or worker processes; batch g does not depend on
how many there are, or of which kind.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import hashlib
import json
import multiprocessing
import os
import threading
import weakref
from multiprocessing import shared_memory
from pathlib import Path
from typing import Iterator

import numpy as np

from flaxbert import host
from flaxbert.data import packing
from flaxbert.data.masking import derive_key, mask_batch, place
from flaxbert.data.shards import SHARD_ARRAYS, load_manifest, masking_config
from flaxbert.errors import DataError

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
              "masked_lm_weights", "next_sentence_labels")
PACKED_KEYS = BATCH_KEYS + ("instance_ids", "position_ids", "next_sentence_weights", "cls_positions")
STATE_VERSION = 2  # 1 was grain's iterator state (per process)
_PER_INSTANCE = ("offsets", "a_lengths", "is_random_next", "mask_offsets")
_FLAT = {"tokens": "offsets", "word_starts": "offsets", "mask_positions": "mask_offsets",
         "mask_inputs": "mask_offsets"}


class PreparedData:
    """A prepared directory's shards as one virtual table of instances.

    Per-instance columns (offsets, A lengths, NSP labels, mask offsets) are read into memory and made global;
    token-level arrays stay memory-mapped. Every file is checked against the manifest when opened, so a missing
    or truncated shard is reported with its name before any batch is made."""

    def __init__(self, prepared_dir: str | os.PathLike):
        self.dir = Path(prepared_dir)
        self.manifest = load_manifest(self.dir)
        self.seq_len = int(self.manifest["max_seq_length"])
        self.max_predictions = int(self.manifest["max_predictions_per_seq"])
        self.flat: list[dict[str, np.ndarray]] = []  # per shard, memory-mapped
        columns: dict[str, list] = {k: [] for k in ("offsets", "mask_offsets", "a_lengths", "is_random_next",
                                                     "lengths", "num_masks", "shard")}
        token_base = mask_base = 0
        for shard in self.manifest["shards"]:
            arrays = self._open_shard(shard)
            self.flat.append({k: np.asarray(arrays[k]) for k in _FLAT})  # plain views of the maps: faster takes
            columns["offsets"].append(arrays["offsets"][:-1] + token_base)
            columns["mask_offsets"].append(arrays["mask_offsets"][:-1] + mask_base)
            columns["a_lengths"].append(arrays["a_lengths"])
            columns["is_random_next"].append(arrays["is_random_next"])
            columns["lengths"].append(np.diff(arrays["offsets"]))
            columns["num_masks"].append(np.diff(arrays["mask_offsets"]))
            columns["shard"].append(np.full(len(arrays["a_lengths"]), len(self.flat) - 1, np.int32))
            token_base += len(arrays["tokens"])
            mask_base += len(arrays["mask_positions"])
        # [instances] each, over all shards
        (self.offsets, self.mask_offsets, self.a_lengths, self.is_random_next, self.lengths, self.num_masks,
         self.shard) = (np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in columns.values())
        self.token_base = np.cumsum([0] + [len(f["tokens"]) for f in self.flat])
        self.mask_base = np.cumsum([0] + [len(f["mask_positions"]) for f in self.flat])

    def _open_shard(self, shard: dict) -> dict[str, np.ndarray]:
        name = str(shard.get("name", ""))
        if not name or Path(name).name != name or name in (".", ".."):
            raise DataError(f"{self.dir / 'manifest.json'}: shard name {name!r} is not a directory name inside "
                            f"the prepared directory")
        arrays = {}
        for key in SHARD_ARRAYS:
            path = self.dir / name / f"{key}.npy"
            try:
                arrays[key] = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise DataError(f"{path}: missing; the prepared directory is incomplete (prepare it again)") \
                    from None
            except (ValueError, OSError) as e:
                raise DataError(f"{path}: unreadable or truncated ({e}); prepare the corpus again") from None
        n = int(shard["instances"])
        for key in _PER_INSTANCE + ("target_lengths",):
            expected = n + 1 if key.endswith("offsets") else n
            if arrays[key].shape != (expected,):
                raise DataError(f"{self.dir / name / (key + '.npy')}: shape {arrays[key].shape}, the manifest "
                                f"says {n} instances; the prepared directory is damaged (prepare it again)")
        for key, offsets in _FLAT.items():
            end = int(arrays[offsets][-1]) if n else 0
            if arrays[key].shape != (end,):
                raise DataError(f"{self.dir / name / (key + '.npy')}: {arrays[key].shape[0]} entries, "
                                f"{offsets}.npy ends at {end}; the prepared directory is damaged")
        arrays.update({k: np.asarray(arrays[k]) for k in _PER_INSTANCE})  # small: read into memory
        lengths = np.diff(arrays["offsets"])
        if n and (lengths.min() < 3 or lengths.max() > self.seq_len):
            raise DataError(f"{self.dir / name / 'offsets.npy'}: instance lengths outside [3, {self.seq_len}]")
        return arrays

    def __len__(self) -> int:
        return len(self.offsets)

    def gather(self, names: tuple[str, ...], index: np.ndarray, valid: np.ndarray,
               shard: np.ndarray) -> list[np.ndarray]:
        """flat[name][index] for each name, wherever `valid` (0 elsewhere). `index` points into the virtual
        concatenation of the shards and `shard` [same shape] says which shard holds each element; the names
        must share one offsets column (tokens and word_starts, or mask_positions and mask_inputs)."""
        base = self.token_base if _FLAT[names[0]] == "offsets" else self.mask_base
        if len(self.flat) == 1:
            where = np.where(valid, index, 0)
            return [np.where(valid, np.take(self.flat[0][n], where), 0) for n in names]
        outs = [np.zeros(index.shape, self.flat[0][n].dtype) for n in names]
        flat_shard = np.where(valid, shard, -1).ravel()
        flat_index = index.ravel()
        present = np.flatnonzero(np.bincount(flat_shard + 1, minlength=len(self.flat) + 1)[1:])
        if len(present) <= 16:  # a comparison per shard is cheaper than sorting
            groups = ((k, np.flatnonzero(flat_shard == k)) for k in present)
        else:  # group the elements by shard with one sort
            order = np.argsort(flat_shard.astype(np.int16 if len(self.flat) < 2**15 else np.int32), kind="stable")
            bounds = np.searchsorted(flat_shard[order], np.arange(len(self.flat) + 1))
            groups = ((k, order[bounds[k]:bounds[k + 1]]) for k in present)
        for k, where in groups:
            local = flat_index[where] - base[k]
            for n, out in zip(names, outs):
                out.reshape(-1)[where] = np.take(self.flat[k][n], local)
        return outs


class BatchMaker:
    """Rows of instance ids [B, K] -> a batch dict; a pure function of its inputs (thread-safe)."""

    def __init__(self, data: PreparedData, masking: str, packed: bool, seed: int):
        self.data, self.masking, self.packed = data, masking, packed
        manifest = data.manifest
        self.mask_cfg = None
        if masking == "dynamic":
            self.mask_cfg = masking_config(manifest, np.load(data.dir / "replacement_ids.npy"))
        self.mask_key = derive_key(seed, 2)

    def __call__(self, slots: np.ndarray, stream_rows: np.ndarray) -> dict[str, np.ndarray]:
        d, S = self.data, self.data.seq_len
        B, K = slots.shape
        filled = slots >= 0
        inst = np.where(filled, slots, 0)
        lengths = np.where(filled, d.lengths[inst], 0)  # [B, K]
        ends = np.cumsum(lengths, axis=1)
        starts = ends - lengths
        col = np.arange(S)
        # [B, S] which slot holds each column: the count of slot ends at or before it
        marks = np.bincount((np.arange(B)[:, None] * (S + 1) + ends).ravel(), minlength=B * (S + 1))
        slot_of = np.minimum(np.cumsum(marks.reshape(B, S + 1)[:, :S], axis=1), K - 1)
        valid = col[None, :] < ends[:, -1:]
        tok_inst = np.take_along_axis(inst, slot_of, axis=1)
        within = col[None, :] - np.take_along_axis(starts, slot_of, axis=1)  # [B, S] position in the instance
        source = d.offsets[tok_inst] + within
        tok_shard = d.shard[tok_inst]
        whole_word = self.mask_cfg is not None and self.mask_cfg.whole_word
        gathered = d.gather(("tokens", "word_starts") if whole_word else ("tokens",), source, valid, tok_shard)
        tokens = gathered[0].astype(np.int32)
        token_types = (valid & (within >= d.a_lengths[tok_inst] + 2)).astype(np.int32)
        if self.masking == "static":
            input_ids, positions, labels, weights = self._static(tokens, inst, filled, starts)
        else:
            m = mask_batch(tokens, valid, gathered[1] if whole_word else None, self.mask_cfg, self.mask_key,
                           stream_rows)
            input_ids, positions, labels, weights = m
        nsp = np.where(filled, d.is_random_next[inst], 0).astype(np.int32)
        batch = {"input_ids": input_ids, "token_type_ids": token_types, "attention_mask": valid.astype(np.int32),
                 "masked_lm_positions": positions, "masked_lm_ids": labels, "masked_lm_weights": weights}
        if not self.packed:
            batch["next_sentence_labels"] = nsp[:, 0]
            return batch
        batch["next_sentence_labels"] = nsp
        batch["instance_ids"] = np.where(valid, slot_of + 1, 0).astype(np.int32)
        batch["position_ids"] = np.where(valid, within, 0).astype(np.int32)
        batch["next_sentence_weights"] = filled.astype(np.float32)
        batch["cls_positions"] = np.where(filled, starts, 0).astype(np.int32)
        return batch

    def _static(self, tokens, inst, filled, starts):
        """The masks written by prepare, moved to row coordinates; a plan never puts more than P in a row."""
        d, P = self.data, self.data.max_predictions
        B, K = inst.shape
        count = np.where(filled, d.num_masks[inst], 0).ravel()  # [B * K] stored masks of each slot
        pair = np.repeat(np.arange(B * K), count)  # one entry per stored mask, in row order
        m = np.arange(len(pair)) - (np.cumsum(count) - count)[pair]  # its index within the slot's masks
        b, k = np.divmod(pair, K)
        slot = (np.cumsum(count.reshape(B, K), axis=1) - count.reshape(B, K))[b, k] + m  # index in the row
        keep = slot < P  # always, for a planned row; kept as a guard
        b, k, m, slot = b[keep], k[keep], m[keep], slot[keep]
        positions, values = d.gather(("mask_positions", "mask_inputs"), d.mask_offsets[inst[b, k]] + m,
                                     np.ones(len(b), bool), d.shard[inst[b, k]])
        return place(tokens, b, slot, positions.astype(np.int64) + starts[b, k], values, P)


class Order:
    """Which units (instances, or packed rows of instance ids) sit at each stream position, epoch by epoch."""

    def __init__(self, data: PreparedData, *, seed: int, shuffle: bool, packed: bool, masking: str,
                 max_instances: int):
        self.data, self.seed, self.shuffle = data, seed, shuffle
        self.plan = None
        if packed:
            sizes = data.lengths
            if masking == "static":  # reserve room for the instance's share of the row's prediction slots
                sizes = np.maximum(sizes, -(-data.num_masks * data.seq_len // data.max_predictions))
            self.sizes = np.minimum(sizes, data.seq_len).astype(np.int64)
            self.plan = packing.plan(self.sizes, data.seq_len, max_instances)
        self.units = self.plan.num_rows if packed else len(data)
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def epoch(self, e: int) -> np.ndarray:
        """[units, K] instance ids of epoch e in stream order (K = 1 unpacked)."""
        if e not in self._cache:
            rng = np.random.default_rng(derive_key(self.seed, 1, e))
            instances = rng.permutation(len(self.data)) if self.shuffle else np.arange(len(self.data))
            if self.plan is None:
                units = instances[:, None]
            else:
                units = packing.deal(self.plan, self.sizes, instances)
                if self.shuffle:
                    units = units[rng.permutation(len(units))]
            self._cache[e] = units
            while len(self._cache) > 2:  # a batch spans at most two epochs once units >= G
                self._cache.popitem(last=False)
        return self._cache[e]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        epochs, within = np.divmod(positions, self.units)
        out = np.empty((len(positions), 1 if self.plan is None else self.plan.max_instances), np.int64)
        for e in np.unique(epochs):
            out[epochs == e] = self.epoch(int(e))[within[epochs == e]]
        return out


class Loader:
    """Iterator of host-local batch dicts with `get_state()` / `set_state()`; `manifest` describes the data."""

    def __init__(self, order: Order, maker: BatchMaker, manifest: dict, settings: dict, *, batch_size: int,
                 process_index: int, process_count: int, num_batches: int | None, last_rows: int,
                 threads: int, processes: int, depth: int, rebuild: tuple | None = None):
        self._order, self._maker = order, maker
        self.manifest, self.settings = manifest, settings
        self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
        self.num_batches, self._last_rows = num_batches, last_rows  # rows per process in the last batch
        self._next = 0  # the next global batch to hand out
        self._lock = threading.Lock()  # the order cache is shared by the workers
        self._pool: concurrent.futures.Executor | None = None
        self._depth = max(depth, 1)
        self._blocks: list[shared_memory.SharedMemory] = []
        if processes > 0:
            # Each worker process opens the data itself (`rebuild`) and writes batch g into shared-memory block
            # g % depth, which is free then: batch g - depth has been copied out. Spawned, not forked: the
            # parent usually runs JAX, whose threads do not survive a fork.
            prepared, order_kwargs, maker_kwargs, nbytes = rebuild
            self._blocks = [shared_memory.SharedMemory(create=True, size=nbytes) for _ in range(self._depth)]
            self._pool = concurrent.futures.ProcessPoolExecutor(
                processes, mp_context=multiprocessing.get_context("spawn"), initializer=_open_worker,
                initargs=(prepared, order_kwargs, maker_kwargs, [b.name for b in self._blocks]))
        elif threads > 0:
            self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        # stops the workers and frees the blocks when the loader is closed, collected, or at interpreter exit
        self._finalizer = weakref.finalize(self, _shut_down, self._pool, self._blocks)
        self._queue: collections.deque = collections.deque()  # futures of batches _next, _next + 1, ...

    def positions(self, g: int) -> np.ndarray:
        """The stream positions of global batch g's rows for this process."""
        b = self._last_rows if self.num_batches is not None and g == self.num_batches - 1 else self.batch_size
        first = g * self.batch_size * self.process_count + self.process_index * b
        return np.arange(first, first + b, dtype=np.int64)

    def batch(self, g: int) -> dict[str, np.ndarray]:
        """Global batch g's rows for this process (a pure function of g and the settings)."""
        positions = self.positions(g)
        with self._lock:
            slots = self._order.rows(positions)
        return self._maker(slots, positions)

    def _submit(self, g: int) -> concurrent.futures.Future:
        if self._blocks:
            return self._pool.submit(_worker_batch, self.positions(g), g % self._depth)
        return self._pool.submit(self.batch, g)

    def _collect(self, g: int, made) -> dict[str, np.ndarray]:
        if not self._blocks:
            return made
        buf = self._blocks[g % self._depth].buf
        return {key: np.ndarray(shape, np.dtype(dtype), buf, offset).copy() for key, dtype, shape, offset in made}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._next >= self.num_batches:
            raise StopIteration
        if self._pool is None:
            out = self.batch(self._next)
        else:
            ahead = self._next + len(self._queue)
            while len(self._queue) < self._depth and (self.num_batches is None or ahead < self.num_batches):
                self._queue.append(self._submit(ahead))
                ahead += 1
            try:
                made = self._queue.popleft().result()
            except concurrent.futures.process.BrokenProcessPool as e:
                raise DataError(f"{self._maker.data.dir}: a loader worker process ended "
                                f"abruptly ({e}); the data position is batch {self._next}") from None
            out = self._collect(self._next, made)
        self._next += 1
        return out

    def get_state(self) -> dict:
        """A small JSON-serialisable dict, the same in every process: the next global batch and the settings."""
        return {"version": STATE_VERSION, "settings": self.settings, "next_batch": self._next}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError("the saved loader state comes from another flaxbert loader (state version "
                            f"{state.get('version', 1)!r}, this one reads {STATE_VERSION}); resume is not possible "
                            "with this checkpoint's data position")
        saved = state.get("settings", {})
        if saved != self.settings:
            diff = {k: (saved.get(k), self.settings.get(k)) for k in sorted(set(saved) | set(self.settings))
                    if saved.get(k) != self.settings.get(k)}
            raise DataError("the saved loader state was made with other data settings; "
                            + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        for future in self._queue:
            future.cancel()
        concurrent.futures.wait(self._queue)  # those already running write into blocks the next ones reuse
        self._queue.clear()
        self._next = int(state["next_batch"])

    def close(self) -> None:
        self._finalizer()
        self._pool = None


def _shut_down(pool: concurrent.futures.Executor | None, blocks: list[shared_memory.SharedMemory]) -> None:
    if pool is not None:
        pool.shutdown(wait=bool(blocks), cancel_futures=True)  # worker processes: none left behind
    for block in blocks:
        block.close()
        block.unlink()


_WORKER: dict = {}  # in a worker process: the order, the batch maker and the parent's shared-memory blocks


def _open_worker(prepared_dir: str, order_kwargs: dict, maker_kwargs: dict, blocks: list[str]) -> None:
    # a batch's temporaries are large blocks that glibc would otherwise unmap and fault in again every batch
    # (~30% of a whole-word batch's time); this process runs no XLA, so the setting is safe whatever the device
    host.reuse_freed_memory(os.environ.get(host.ENV) or "reuse")
    data = PreparedData(prepared_dir)
    _WORKER["order"] = Order(data, **order_kwargs)
    _WORKER["maker"] = BatchMaker(data, **maker_kwargs)
    # attached blocks are registered with the parent's resource tracker, which frees them if the parent dies
    _WORKER["blocks"] = [shared_memory.SharedMemory(name=name) for name in blocks]


def _worker_batch(positions: np.ndarray, slot: int) -> list:
    """Makes a batch in a worker process into the parent's shared-memory block `slot`; returns its layout."""
    batch = _WORKER["maker"](_WORKER["order"].rows(positions), positions)
    buf, layout, offset = _WORKER["blocks"][slot].buf, [], 0
    for key, array in batch.items():
        if offset + array.nbytes > len(buf):
            raise DataError(f"a batch needs more than the {len(buf)} bytes reserved for it")
        np.ndarray(array.shape, array.dtype, buf, offset)[...] = array
        layout.append((key, array.dtype.str, array.shape, offset))
        offset += array.nbytes
    return layout


def batch_nbytes(batch_size: int, seq_len: int, max_predictions: int, max_instances: int) -> int:
    """An upper bound on a batch's bytes (every array holds 4-byte values): [B, S] x 5, [B, P] x 3, [B, K] x 3."""
    return 4 * batch_size * (5 * seq_len + 3 * max_predictions + 3 * max_instances)


def prepared_id(manifest: dict) -> str:
    """A fingerprint of a prepared directory (its manifest without the timing)."""
    return hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "throughput"},
                                     sort_keys=True).encode()).hexdigest()[:16]


def make_loader(prepared_dir: str | os.PathLike, *, batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                masking: str = "static", packed: bool = False, max_instances_per_row: int = 8,
                drop_remainder: bool = True, prefetch_threads: int = 2, prefetch_processes: int = 0,
                prefetch_depth: int = 4, tokenizer_sha256: str | None = None) -> Loader:
    """Batches of `batch_size` rows (this process's share of a global batch of batch_size * process_count).

    `num_epochs=None` repeats forever (batches then run across epoch boundaries); with a finite count the last
    partial global batch is dropped, or with `drop_remainder=False` kept, cut to a multiple of the process
    count so every process gets as many rows. `packed=True` puts up to `max_instances_per_row` instances in a
    row (see `packing`). `prefetch_threads` worker threads make the next `prefetch_depth` batches ahead
    (0 threads: made on demand); `prefetch_processes` > 0 makes them in that many worker processes instead,
    which run in parallel where threads contend for the GIL (each opens the data itself, and they take a
    second or two to start). `tokenizer_sha256`, when given, must match the tokenizer of the prepared data.
    """
    if masking not in ("static", "dynamic"):
        raise DataError(f"masking must be 'static' or 'dynamic', got {masking!r}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside [0, {process_count})")
    if prefetch_threads < 0 or prefetch_processes < 0:
        raise DataError(f"prefetch_threads and prefetch_processes must be >= 0, got {prefetch_threads} and "
                        f"{prefetch_processes}")
    if batch_size < 1 or max_instances_per_row < 1:
        raise DataError(f"batch_size and max_instances_per_row must be positive, got {batch_size} and "
                        f"{max_instances_per_row}")
    data = PreparedData(prepared_dir)
    manifest = data.manifest
    if tokenizer_sha256 is not None and manifest.get("tokenizer_sha256") != tokenizer_sha256:
        raise DataError(f"{data.dir}: prepared with tokenizer {manifest.get('tokenizer')!r} (sha256 "
                        f"{str(manifest.get('tokenizer_sha256'))[:12]}...), not the model's tokenizer "
                        f"({tokenizer_sha256[:12]}...); prepare the corpus again with the model's tokenizer")
    order_kwargs = dict(seed=seed, shuffle=shuffle, packed=packed, masking=masking,
                        max_instances=max_instances_per_row)
    maker_kwargs = dict(masking=masking, packed=packed, seed=seed)
    order = Order(data, **order_kwargs)
    G = batch_size * process_count
    num_batches, last_rows = None, batch_size
    if num_epochs is not None:
        total = num_epochs * order.units
        num_batches, rest = divmod(total, G)
        if rest // process_count and not drop_remainder:
            num_batches, last_rows = num_batches + 1, rest // process_count
    if num_batches == 0 or (drop_remainder and order.units < G):
        raise DataError(f"{prepared_dir}: {len(data)} instances ({order.units} rows) give fewer than one global "
                        f"batch of {G} rows ({batch_size} per process x {process_count} processes)")
    settings = {"prepared": prepared_id(manifest), "global_batch_size": G, "seed": seed, "shuffle": shuffle,
                "num_epochs": num_epochs, "masking": masking, "packed": packed,
                "max_instances_per_row": max_instances_per_row if packed else None,
                "drop_remainder": drop_remainder}
    return Loader(order, BatchMaker(data, **maker_kwargs), manifest, settings, batch_size=batch_size,
                  process_index=process_index, process_count=process_count, num_batches=num_batches,
                  last_rows=last_rows, threads=prefetch_threads, processes=prefetch_processes,
                  depth=prefetch_depth,
                  rebuild=(str(data.dir), order_kwargs, maker_kwargs,
                           batch_nbytes(batch_size, data.seq_len, data.max_predictions,
                                        max_instances_per_row if packed else 1)))
