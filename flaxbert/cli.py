"""The one error path of every entry point (`pretrain`, `finetune`, `data prepare`, `vocab`, `pipelines`).

flaxbert's own errors (bad config, data, vocabulary, checkpoint or HF files) and OS errors on the paths a user
gave become one line on stderr and exit code 2; the full traceback goes to a log file (the run directory's
`flaxbert.log` when there is one, else a file in the temp directory), whose path that line names. Anything
else is a bug and keeps its traceback. `log_to(directory)` also sends the run's log records to that file.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Optional

from flaxbert.errors import (CheckpointError, ConfigError, DataError, HFLoadError, InputError, VocabError)

LOG_NAME = "flaxbert.log"

# (type, what the line calls it); the first match wins, so subclasses come before their bases
_KINDS: tuple[tuple[type, str], ...] = (
    (ConfigError, "config error"), (DataError, "data error"), (VocabError, "vocabulary error"),
    (HFLoadError, "checkpoint load error"), (CheckpointError, "checkpoint error"), (InputError, "input error"),
    (OSError, "file error"),
)
USER_ERRORS = tuple(t for t, _ in _KINDS)


def _kind(error: BaseException) -> str:
    return next(name for t, name in _KINDS if isinstance(error, t))


def one_line(error: BaseException) -> str:
    """The error's message as one line: its first line, with the number of lines left out."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] + (f" (+{len(lines) - 1} more lines in the log)" if len(lines) > 1 else "")


def _log_path(prog: str, directory: Optional[str]) -> str:
    if directory and os.path.isdir(directory):  # never created here: nothing is written before validation
        return os.path.join(directory, LOG_NAME)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(tempfile.gettempdir(), f"{prog.replace('.', '-')}-{stamp}-{os.getpid()}.log")


def _write_traceback(prog: str, directory: Optional[str]) -> Optional[str]:
    path = _log_path(prog, directory)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {prog} failed: {' '.join(sys.argv)}\n")
            f.write(traceback.format_exc() + "\n")
    except OSError:
        return None
    return path


def program_environment() -> None:
    """Settings for the process of a flaxbert command (`python -m flaxbert.<command>`), made before anything
    imports transformers. flaxbert uses its tokenizers alone, and transformers imports PyTorch when it is installed
    (6-7 s of every command's start on 2 CPU cores). `USE_TORCH=1` in the environment keeps it. Not set for a
    program that imports flaxbert as a library, which may use transformers' PyTorch models."""
    os.environ.setdefault("USE_TORCH", "0")


def run(prog: str, body: Callable[[], int], log_dir: Callable[[], Optional[str]] = lambda: None) -> int:
    """`body()`'s exit code, or 2 with one line on stderr for a user error. `log_dir()` names the directory
    whose log file takes the traceback (called after the failure, so it may depend on what was parsed)."""
    try:
        return body()
    except USER_ERRORS as e:
        try:
            directory = log_dir()
        except Exception:  # the failure may have come before the directory was known
            directory = None
        path = _write_traceback(prog, directory)
        where = f" [traceback: {path}]" if path else ""
        print(f"{prog}: {_kind(e)}: {one_line(e)}{where}", file=sys.stderr)
        if isinstance(e, CheckpointError) and _stuck_save_threads():
            # A save that failed before its directory existed leaves orbax's worker threads waiting for a
            # "directory created" signal that never comes (up to its async timeout, 10 minutes): the process
            # would not exit. What the run had saved is committed and the log is flushed, so exit now.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


def _stuck_save_threads() -> list[threading.Thread]:
    """orbax's non-daemon background threads still alive (in a process whose checkpoint save failed)."""
    return [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
            and not t.daemon and type(t).__module__.startswith("orbax")]


def log_to(directory: str) -> None:
    """Also write this process's log records (INFO and up) to `directory/flaxbert.log` (once per file)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.abspath(os.path.join(directory, LOG_NAME))
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in root.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    # orbax reports a failed background save through absl with its traceback: to the file, not the terminal
    # (the run's own error says what failed in one line)
    absl = logging.getLogger("absl")
    absl.propagate = False
    absl.addHandler(handler)
