"""A sequence-length schedule inside one run, as BERT's phases 1 and 2 (`data.short_seq_len`): the first share of
the run trains on short rows, the rest on full ones. One learning-rate schedule and optimizer state span both; the
step compiles once per row length. The batches' state names the phase, so a checkpoint resumes in it."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from flaxbert.errors import DataError


@dataclasses.dataclass(frozen=True)
class ShortRows:
    """The first phase of a run: its batches (host-local, with get_state/set_state like the run's own), their
    tokens per row, FLOPs per token (0: not reported) and the share of the run they train (of run.steps, or of a
    budget run's schedule time)."""

    batches: Iterator[dict]
    seq_len: int
    flops_per_token: float
    share: float


class PhasedBatches:
    """The short rows' batches until `advance()`, then the full rows'. `get_state()` is {"phase": 0 or 1,
    "loader": that phase's loader state}; a phase-2 state starts the full rows where they stood."""

    def __init__(self, short: Iterator[dict], full: Iterator[dict]):
        self._loaders = (short, full)
        self.phase = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._loaders[self.phase])

    def advance(self) -> None:
        """Into phase 2 (the full rows); the short rows' loader is closed."""
        if self.phase == 0:
            self.phase = 1
            close = getattr(self._loaders[0], "close", None)
            if close is not None:
                close()

    def get_state(self) -> dict:
        return {"phase": self.phase, "loader": self._loaders[self.phase].get_state()}

    def set_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("phase") not in (0, 1) or "loader" not in state:
            raise DataError("the checkpoint's data position was saved by a run without a sequence-length schedule "
                            "(data.short_seq_len); resume it without one, or start a new run")
        if state["phase"] == 1:
            self.advance()
        self._loaders[self.phase].set_state(state["loader"])

    def close(self) -> None:
        for loader in self._loaders:
            close = getattr(loader, "close", None)
            if close is not None:
                close()
