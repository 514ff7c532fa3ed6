"""Divergence short of NaN (`run.spike_factor`): a loss far above its running median for several steps stops
the run under nan_policy=stop, and the "last good" checkpoint named is one written before the first bad step."""

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxbert import run_config as rc
from flaxbert.config import ConfigError
from flaxbert.train import loop
from flaxbert.train.loop import _SpikeWatch
from flaxbert.train.step import LossOutput


def test_spike_watch_needs_a_run_of_spikes_and_keeps_them_out_of_the_median():
    watch = _SpikeWatch(10.0, 3, warm=5)
    assert all(watch.see(s, 1.0) is None for s in range(1, 11))
    assert watch.see(11, 50.0) is None  # one spike is not divergence
    assert watch.see(12, 1.0) is None  # back to normal: the run starts again
    assert watch.see(13, 50.0) is None and watch.see(14, 60.0) is None
    message = watch.see(15, 70.0)
    assert message and "since step 13" in message and "above 10 x the median 1" in message
    assert list(watch.history) == [1.0] * 11  # the spikes did not enter the median
    assert _SpikeWatch(0.0, 3).see(1, 1e30) is None  # off


class Batches:
    """Regression batches whose targets jump by 1000 from global batch `blow_up` on (the loss explodes there,
    and stays finite)."""

    def __init__(self, blow_up: int):
        self.i, self.blow_up = 0, blow_up

    def __next__(self):
        rng = np.random.default_rng(self.i)
        x = rng.normal(size=(8, 4)).astype(np.float32)
        y = x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + (1000.0 if self.i >= self.blow_up else 0.0)
        self.i += 1
        return {"x": x, "y": y}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def _loss(params, batch, rng):
    err = batch["x"] @ params["w"] - batch["y"]
    return LossOutput(terms={"mse": (jnp.sum(err ** 2), jnp.float32(err.size))})


def test_divergence_stops_before_the_next_checkpoint_and_names_the_one_before_it(tmp_path):
    cfg = rc.RunConfig()
    cfg = dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, lr=1e-2, warmup_steps=0, clip_norm=0.0, decay="constant"),
        run=dataclasses.replace(cfg.run, output_dir=str(tmp_path), steps=200, global_batch_size=8, log_every=5,
                                eval_every=0, progress=False, spike_factor=10.0, spike_steps=3),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=8, async_save=False))
    job = loop.Job(init_params=lambda rng: {"w": jnp.zeros(4)}, logical_axes={"w": P(None)}, loss_fn=_loss,
                   train_batches=Batches(blow_up=46), seq_len=1)
    result = loop.train(cfg, job)
    assert result.reason == "diverged", result
    # steps 47, 48, 49 spike (batch 46 is step 47's); it is reported at the log point of step 50
    assert result.step == 50 and "since step 47" in result.message
    good = int(re.search(r"last good checkpoint is step (\d+)", result.message).group(1))
    assert good == 40  # written before step 47; none was written at or after it
    with pytest.raises(ConfigError, match="run.spike_factor must be 0"):
        dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, spike_factor=0.5))
