"""The host allocator setting (flaxbert/host.py): with it, freed memory is reused instead of being
faulted back in from the kernel on every step. Measured in fresh processes (the setting is process-wide)."""

import json
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, resource, sys, threading
from flaxbert import host
done = host.reuse_freed_memory(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 48 << 20
def churn():  # like XLA's worker threads: allocate a step's buffer, touch it, free it
    for _ in range(4):
        p = libc.malloc(SIZE)
        ctypes.memset(p, 1, SIZE)
        libc.free(p)
def in_threads():
    ts = [threading.Thread(target=churn) for _ in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
in_threads()  # warm-up: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_threads()
print(json.dumps({"done": done, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(mode):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reuse_stops_page_faults_on_freed_memory():
    system, reuse = _probe("system"), _probe("reuse")
    assert system["done"].startswith("system") and reuse["done"].startswith("reuse")
    pages = 2 * 4 * (48 << 20) // 4096
    assert system["faults"] > 0.9 * pages  # glibc's default: every 48 MiB block comes back from the kernel
    assert reuse["faults"] < 0.05 * pages


def test_bad_mode_is_named():
    from flaxbert import host

    with pytest.raises(ValueError, match="FLAXBERT_HOST_MALLOC"):
        host._state.pop("result", None)
        try:
            host.reuse_freed_memory("sometimes")
        finally:
            host._state.pop("result", None)
