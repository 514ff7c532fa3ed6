"""Runs `python -m flaxbert.pretrain ARGS` with a fault injected into orbax's save path, at the moment a
checkpoint of step STEP is committed (its temporary directory fully written, not yet renamed):
  kill    the process is SIGKILLed there (a kill -9 during an asynchronous save);
  enospc  the commit fails with ENOSPC (a full disk);
  gone    the checkpoint directory is replaced by a file once the run has checked it (a lost mount), so the
          first save fails before its temporary directory exists (STEP is unused).
usage: python tests/fault_save_script.py kill|enospc|gone STEP ARGS..."""

import errno
import os
import shutil
import signal
import sys

from orbax.checkpoint._src.path import async_path

mode, step, args = sys.argv[1], sys.argv[2], sys.argv[3:]
original = async_path.rename


async def rename(src, dst):
    if os.path.basename(str(dst)) == step:
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device", str(src))
    return await original(src, dst)


async_path.rename = rename
from flaxbert import pretrain  # noqa: E402
from flaxbert.train import checkpoint  # noqa: E402

if mode == "gone":
    checked = checkpoint.Checkpointer.__init__

    def init(self, directory, **kw):
        checked(self, directory, **kw)
        shutil.rmtree(str(self.directory))
        open(str(self.directory), "w").close()

    checkpoint.Checkpointer.__init__ = init

sys.exit(pretrain.main(args))
