"""Host-process settings for training on the CPU: glibc's malloc told to keep and reuse freed memory.

XLA:CPU allocates every step's temporaries (activations saved for the backward pass, gradients, optimizer
updates) afresh and frees them at the end of the step. glibc hands large blocks back to the kernel (mmap /
munmap, heap trimming, per-thread arenas), so the next step faults every page back in, zero-filled. For
BERT-base at seq 128, batch 8 that is about 440k minor page faults (1.8 GB) and 0.8 s of kernel time per
3.6 s step. With one arena, no mmap for large blocks and no trimming, freed memory is reused and the faults
go to zero (see docs/benchmarks.md for the measured gain).

The settings are process-wide and must be made before XLA starts its thread pools (before the first
computation), so only entry points call `reuse_freed_memory()`; importing flaxbert changes nothing.
`FLAXBERT_HOST_MALLOC=system` turns it off, `=reuse` forces it on; by default it is on unless a GPU/TPU
plugin for JAX is installed (the host allocator does not matter there) or the user has set glibc's own
MALLOC_* / GLIBC_TUNABLES variables.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "FLAXBERT_HOST_MALLOC"
# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = {"arena_max": 1, "mmap_max": 0, "trim_threshold": -1, "top_pad": 64 << 20}  # -1: SIZE_MAX, never trim
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")
_state: dict = {}


def _user_tuned_glibc() -> bool:
    return any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ


def _accelerator_plugin() -> str | None:
    for name in _ACCELERATOR_PLUGINS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def reuse_freed_memory(mode: str | None = None) -> str:
    """Apply the allocator settings above (once per process). `mode` is 'auto' (default, or the
    FLAXBERT_HOST_MALLOC variable), 'reuse' or 'system'. Returns what was done, in words."""
    if "result" in _state:
        return _state["result"]
    mode = (mode or os.environ.get(ENV, "auto")).strip().lower()
    if mode not in ("auto", "reuse", "system"):
        raise ValueError(f"{ENV}={mode!r}: expected auto, reuse or system")
    result = _decide(mode)
    if result == "reuse":
        result = _apply()
    _state["result"] = result
    log.debug("host malloc: %s", result)
    return result


def current() -> str:
    """What `reuse_freed_memory` did in this process, without applying anything."""
    return _state.get("result", "system (flaxbert.host not applied in this process)")


def _decide(mode: str) -> str:
    if mode == "system":
        return f"system (glibc defaults: {ENV}=system)"
    if not sys.platform.startswith("linux"):
        return "system (not Linux)"
    if mode == "auto":
        if _user_tuned_glibc():
            return "system (the user set MALLOC_* or GLIBC_TUNABLES)"
        plugin = _accelerator_plugin()
        if plugin:
            return f"system (accelerator plugin {plugin} installed)"
    return "reuse"


def _apply() -> str:
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system (no glibc mallopt)"
    ok = all(mallopt(param, value) == 1 for param, value in ((M_ARENA_MAX, SETTINGS["arena_max"]),
                                                            (M_MMAP_MAX, SETTINGS["mmap_max"]),
                                                            (M_TRIM_THRESHOLD, SETTINGS["trim_threshold"]),
                                                            (M_TOP_PAD, SETTINGS["top_pad"])))
    if not ok:
        return "system (mallopt refused a setting)"
    return "reuse (glibc mallopt: arena_max=1, mmap_max=0, no trimming, top_pad=64 MiB)"


def configure_logging() -> None:
    """An entry point's logging: INFO and up on stderr with a timestamp (results stay on stdout); the chatty
    libraries at WARNING. Does nothing to a process that has configured logging already."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
