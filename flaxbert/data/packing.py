"""Sequence packing plans: which instances share a row, decided once from the length histogram.

The plan follows the idea of Krell et al. 2021 ("Efficient sequence packing without cross-contamination"):
packing depends only on how many instances there are of each size, so it is solved once on the histogram
(longest sizes first, each into the open pack with the least room that still fits it: best-fit decreasing,
computed on counts; Krell et al. call it "shortest pack first")
and gives a list of strategies: a tuple of sizes and how many rows use it. Every epoch then only deals
instances, in that epoch's random order, into the strategies' slots, which is a few numpy operations.

A row holds at most `max_instances` instances and `seq_len` tokens. An instance's size is its length, or more
when its static masks need more than its share of the row's `max_predictions` slots, so that no planned row
ever has more predictions than fit.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackingPlan:
    strategies: tuple[tuple[tuple[int, ...], int], ...]  # (sizes in the row, number of rows)
    max_instances: int

    @property
    def num_rows(self) -> int:
        return sum(count for _, count in self.strategies)


def plan(sizes: np.ndarray, seq_len: int, max_instances: int) -> PackingPlan:
    """Strategies that pack every instance of the given sizes (1..seq_len) into rows of `seq_len`."""
    histogram = np.bincount(np.asarray(sizes, np.int64), minlength=seq_len + 1)
    if len(histogram) > seq_len + 1 or histogram[0]:
        raise ValueError(f"instance sizes must be in [1, {seq_len}]")
    open_room: list[int] = []  # sorted rooms that have open packs
    packs: dict[int, list[list]] = {}  # room -> open packs [sizes, count] with that room left
    done: list[tuple[tuple[int, ...], int]] = []

    def put(sizes_: tuple[int, ...], count: int) -> None:
        room = seq_len - sum(sizes_)
        if room == 0 or len(sizes_) == max_instances:
            done.append((sizes_, count))
            return
        if room not in packs:
            packs[room] = []
            bisect.insort(open_room, room)
        packs[room].append([sizes_, count])

    for size in range(seq_len, 0, -1):
        left = int(histogram[size])
        while left:
            i = bisect.bisect_left(open_room, size)  # the least room that fits
            if i == len(open_room):  # new rows, each with as many of these as fit (as item-by-item best fit does)
                per = max(1, min(max_instances, seq_len // size))
                full, rest = divmod(left, per)
                if full:
                    put((size,) * per, full)
                if rest:
                    put((size,) * rest, 1)
                break
            room = open_room[i]
            pack = packs[room][-1]
            take = min(left, pack[1])
            pack[1] -= take
            if not pack[1]:
                packs[room].pop()
                if not packs[room]:
                    del packs[room]
                    open_room.pop(i)
            put(pack[0] + (size,), take)
            left -= take
    done.extend((sizes_, count) for room in open_room for sizes_, count in packs[room])
    return PackingPlan(tuple(sorted(done)), max_instances)


def deal(packing: PackingPlan, sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[num_rows, max_instances] instance ids (-1 = empty slot): the instances, taken in `order`, dealt into
    the plan's slots (each size's instances fill that size's slots in order). Rows come out grouped by
    strategy; the caller shuffles them."""
    by_size = order[np.argsort(sizes[order], kind="stable")]  # grouped by size, `order` kept within a size
    next_of = np.concatenate([[0], np.cumsum(np.bincount(sizes, minlength=int(sizes.max(initial=0)) + 1))])
    rows = np.full((packing.num_rows, packing.max_instances), -1, np.int64)
    r = 0
    for strategy, count in packing.strategies:
        for slot, size in enumerate(strategy):
            rows[r:r + count, slot] = by_size[next_of[size]:next_of[size] + count]
            next_of[size] += count
        r += count
    return rows
