"""Fine-tuning: config, model loading, the task's loss, a resumable bucketed batch iterator, and
evaluation of the loop's checkpoints with best-checkpoint selection and the output files.

Training itself is the shared engine's (`flaxbert.train.loop`: one step, one checkpointer, one
metrics writer); this module supplies the task's `loss_fn` and batches, and checkpoints every
`1/evals_per_epoch` epoch so that each can be evaluated and the best one kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import yaml

from flaxbert import hf, run_config
from flaxbert.errors import CheckpointError, ConfigError, DataError
from flaxbert.infer import batching
from flaxbert.finetune import evaluate as E
from flaxbert.infer import features as F
from flaxbert.infer import predict
from flaxbert.finetune.task_data import Columns, FeatureSettings, TaskData, load_task_data, make_features
from flaxbert.finetune.tasks import Task, get_task
from flaxbert.heads import apply_head, init, logical_axes
from flaxbert.train import loop
from flaxbert.train.checkpoint import Checkpointer
from flaxbert.train.engine import Trained, build_engine

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """The `task` section of a fine-tuning config (the other sections are `flaxbert.run_config`'s)."""

    name: str = ""  # a registered task (sst2, conll2003, squad, text_classification, ...); see tasks.TASKS
    model: str = ""  # HF model directory, or a directory written by a previous fine-tuning run
    data: str = ""  # directory | files (a.csv,b.csv or train=a,dev=b) | saved/named HF dataset | tfds:NAME
    text_column: str = "text"  # custom tasks: column names
    text_pair_column: str = ""
    label_column: str = "label"
    max_length: int = 128  # tokens per sequence (longer ones are truncated)
    epochs: float = 3.0  # may be fractional
    max_train_examples: int = 0  # > 0: the first N training examples only
    max_eval_examples: int = 0
    eval_batch_size: int = 64
    warmup_ratio: float = 0.1  # fraction of the steps with linear warmup (sets optim.warmup_steps)
    evals_per_epoch: int = 1
    bucket_min: int = 16  # smallest length bucket; buckets double up to max_length
    pad_to_max: bool = False  # pad every batch to max_length (the baseline bucketing is compared with)
    pack: bool = True  # sequence-level tasks: pack each step's examples side by side into rows (batching.py)
    pack_length: int = 64  # tokens per packed row (a longer example gets a longer row)
    on_head_mismatch: str = "reinit"  # a checkpoint head with another label count: reinit (notice) | error
    label_all_tokens: bool = False  # NER: train on every sub-token, not only on each word's first
    ner_scheme: str = ""  # "" = conlleval/seqeval default decoding | IOB2 | IOB1 (strict)
    doc_stride: int = 128  # QA
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    version_2: bool = False  # SQuAD 2.0: unanswerable questions, null threshold tuned on dev
    save_model: bool = True  # write the best model as a HF directory (output_dir/best_model)
    crf: bool = False  # NER: a linear-chain CRF over the token classifier (loss and Viterbi decoding)
    crf_constraints: bool = True  # with crf: BIO constraints at decoding (I-X only after B-X or I-X)

    def __post_init__(self):
        if self.crf:
            kind = get_task(self.name).spec if self.name else None
            if kind is None or not kind.crf_kinds:
                raise ConfigError(f"task.crf=true is for NER tasks (kind ner); task {self.name or '(none)'!r} is "
                                  f"{'of kind ' + repr(kind.name) if kind else 'not named'}")
            if self.label_all_tokens:
                raise ConfigError("task.crf=true scores each word's first sub-token only; drop "
                                  "task.label_all_tokens=true")
        if self.on_head_mismatch not in ("reinit", "error"):
            raise ConfigError(f"task.on_head_mismatch must be 'reinit' or 'error', got {self.on_head_mismatch!r}")
        if self.ner_scheme not in ("", "IOB2", "BIO", "IOB1"):
            raise ConfigError(f"task.ner_scheme must be '', 'IOB2' or 'IOB1', got {self.ner_scheme!r}")

    def configured(self, task: Task) -> Task:
        """`task` as these settings train it: with crf, its kind's CRF variant."""
        return dataclasses.replace(task, kind=task.spec.crf_kinds[self.crf_constraints]) if self.crf else task

    def feature_settings(self) -> FeatureSettings:
        qa = F.QASettings(self.max_length, self.doc_stride, self.max_query_length, self.n_best_size,
                          self.max_answer_length)
        return FeatureSettings(self.max_length, self.label_all_tokens, qa)


FINETUNE_DEFAULTS = {"optim": {"lr": 5e-5, "warmup_steps": 0, "weight_decay": 0.01},
                     "run": {"output_dir": "runs/finetune", "global_batch_size": 32, "log_every": 50},
                     "model": {"max_position_embeddings": 512}}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    task: TaskSettings
    run: run_config.RunConfig  # optim, run (output_dir, batch size, seed, ...), checkpoint, mesh

    def to_dict(self) -> dict:
        d = self.run.to_dict()
        d.pop("data")
        d.pop("model")  # the model comes from task.model
        return {"task": dataclasses.asdict(self.task), **d}


def load_config(config: str = "", overrides: Sequence[str] = (), tree: Optional[Mapping] = None) -> FinetuneConfig:
    """Defaults, then a YAML (`configs/finetune/NAME.yaml` or a path), then `tree`, then
    `--section.key=value` overrides. The `task` section is validated here, the rest by run_config."""
    sources = []
    if config:
        path = config if os.path.isfile(config) else run_config.resolve_config_path(os.path.join("finetune", config))
        sources.append(run_config.load_yaml(path))
    if tree:
        sources.append(tree)
    sources.append(run_config.parse_overrides(list(overrides)))
    merged = run_config.merge_sources(FINETUNE_DEFAULTS, sources)
    settings = run_config.section_from_dict("task", merged.pop("task", {}), TaskSettings())
    return FinetuneConfig(settings, run_config.from_dict(merged))


# ------------------------------------------------------------------------------------------------
# model and loss
# ------------------------------------------------------------------------------------------------


def load_model(task: Task, settings: TaskSettings) -> hf.PretrainedModel:
    """The encoder (HF directory, or a pretraining run directory) with the task's head. A head of
    another shape in the checkpoint is re-initialised with a notice, or refused, per
    `on_head_mismatch`."""
    if not settings.model:
        raise ConfigError("task.model is empty: give --model <HF model dir | fine-tuned model dir | pretraining run>")
    num_labels = task.num_labels
    try:
        if is_pretraining_run(settings.model):
            model = load_pretraining_run(settings.model, task.head, num_labels)
        else:
            model = task.spec.load_model(settings.model, num_labels, settings.on_head_mismatch)
    except hf.HFLoadError as e:
        message = str(e)
        raise DataError(message if settings.model in message else f"{settings.model}: {message}") from None
    if model.report is not None and model.report.initialized:
        log.warning("%s: the %s head is newly initialised (%d tensors: %s%s)", settings.model, task.head,
                    len(model.report.initialized), ", ".join(model.report.initialized[:4]),
                    " ..." if len(model.report.initialized) > 4 else "")
    try:
        model.check_tokenizer(settings.model)
    except hf.HFLoadError as e:  # before any feature is made or anything compiles
        raise DataError(str(e)) from None
    return model


def saved_label_order(model: hf.PretrainedModel, task: Task) -> Task:
    """Label names saved with a fine-tuned model fix the label order when they are the task's set."""
    id2label = model.hf_extra.get("id2label")
    if task.labels and id2label and len(id2label) == len(task.labels):
        names = tuple(id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label)))
        if set(names) == set(task.labels):
            return task.with_labels(names)
    return task


def make_loss_fn(task: Task, config):
    """The task's loss as (sum, weight) for the shared step (its kind's `loss`). Filler rows (weight 0) and
    unscored NER positions (label -100) carry no weight, so the mean is over real labelled tokens only."""
    head, kind = task.head, task.spec

    def loss_fn(params, batch, dropout_rng):
        return kind.loss(apply_head(params, batch, config, head=head, dropout_rng=dropout_rng), batch)

    return loss_fn


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneResult:
    task: Task
    metrics: dict[str, dict[str, float]]  # eval set -> metrics of the best checkpoint
    best_step: int
    train_seconds: float  # wall time of the training loop (compilation and checkpoint saves included)
    real_tokens_per_sec: float  # non-pad tokens per second of training
    padded_tokens_per_sec: float  # all positions, pad included
    output_dir: str
    params: Any = None  # best parameters (host numpy)


def _main_metric(task: Task, metrics_by_set: Mapping[str, Mapping[str, float]]) -> float:
    """The selection metric: unprefixed names refer to the first eval set, `<set>_<metric>` to any."""
    flat = dict(next(iter(metrics_by_set.values())))
    for name, m in metrics_by_set.items():
        flat.update({f"{name}_{k}": v for k, v in m.items()})
    if task.main_metric not in flat:
        raise ValueError(f"metric {task.main_metric!r} not among {sorted(flat)}")
    return float(flat[task.main_metric])


class BucketedBatches:
    """The loop's training iterator: shuffled length-bucketed batches, epoch after epoch.

    Its state (epoch, batch position) goes into every checkpoint, so a resumed run continues with
    the same batches. It counts real and padded tokens for the throughput report."""

    def __init__(self, features: Sequence[dict], batch_size: int, boundaries: Sequence[int], seed: int):
        self.features, self.batch_size, self.boundaries, self.seed = features, batch_size, boundaries, seed
        self.epoch, self.position, self._it = 0, 0, None
        self.real_tokens = self.padded_tokens = 0

    def _make_epoch(self, seed: int):
        return batching.make_batches(self.features, self.batch_size, self.boundaries, shuffle=True, seed=seed)

    def _start_epoch(self):
        self._it = self._make_epoch(self.seed * 1000 + self.epoch)
        for _ in range(self.position):
            next(self._it)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start_epoch()
        batch = next(self._it, None)
        if batch is None:
            self.epoch, self.position = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._it)
        self.position += 1
        self.real_tokens += batching.real_tokens(batch)
        self.padded_tokens += batch["input_ids"].size
        return {k: v for k, v in batch.items() if k != "index"}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None


class PackedBatches(BucketedBatches):
    """Like BucketedBatches, but each step's `batch_size` shuffled examples are packed into rows of
    `row_length` tokens (`batching.make_packed_batches`)."""

    def __init__(self, features: Sequence[dict], batch_size: int, row_length: int, seed: int, row_multiple: int):
        super().__init__(features, batch_size, (row_length,), seed)
        self.row_multiple = row_multiple

    def _make_epoch(self, seed: int):
        return batching.make_packed_batches(self.features, self.batch_size, self.boundaries[0], seed=seed,
                                            row_multiple=self.row_multiple)


@dataclasses.dataclass
class Best:
    """The best evaluation so far: its main-metric score, step, host parameters and per-set results."""
    score: float = -math.inf
    step: int = 0
    params: Any = None  # None for a best found before a resume (its checkpoint is restored at the end)
    results: dict = dataclasses.field(default_factory=dict)


class SelectBest(loop.Snapshots):
    """The loop's evaluation hook: every `every` steps and after the last one, the eval sets are scored and the
    best parameters on the task's main metric are kept (no checkpoint is read back). The best's step, score
    and metrics also go to `best.json`, so that a resumed run knows what it has to beat."""

    def __init__(self, every: int, evaluate, task: Task, out_dir: str, prior: Optional[dict] = None):
        self.every, self.evaluate, self.task = every, evaluate, task
        self.path = os.path.join(out_dir, "best.json")
        self.best = Best(float(prior["score"]), int(prior["step"])) if prior else Best()

    def due(self, step: int, train_seconds: float) -> bool:
        return step % self.every == 0

    def take(self, step: int, train_seconds: float, params) -> dict[str, dict]:
        """Scores the eval sets; returns their records (`eval_<set>`: metrics and speed) for metrics.jsonl."""
        results = self.evaluate(params, step)
        score = _main_metric(self.task, {n: r.metrics for n, r in results.items()})
        log.info("step %d: %s = %.4f %s", step, self.task.main_metric, score,
                 json.dumps({n: {k: round(v, 4) for k, v in r.metrics.items()} for n, r in results.items()}))
        if score > self.best.score:
            self.best = Best(score, step, params, results)
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump({"step": step, "score": score, "metrics": {n: r.metrics for n, r in results.items()}}, f)
        speed = lambda r: {} if r.real_tokens_per_sec is None else {"real_tokens_per_sec": r.real_tokens_per_sec}  # noqa: E731
        return {f"eval_{n}": {**r.metrics, **speed(r)} for n, r in results.items()}


@dataclasses.dataclass
class Prepared:
    """A fine-tuning run's inputs: the task with its labels, the model, features and batching."""
    task: Task
    model: hf.PretrainedModel
    task_data: TaskData
    train_features: list
    eval_features: dict
    boundaries: tuple
    pack: bool


def prepare(cfg: FinetuneConfig, task_data: Optional[TaskData] = None) -> Prepared:
    """Read the task's data, load the model with its head and make the features."""
    s = cfg.task
    task = s.configured(get_task(s.name))
    if task_data is None:
        task_data = load_task_data(task, s.data, columns=Columns(s.text_column, s.text_pair_column, s.label_column),
                                   max_train=s.max_train_examples, max_eval=s.max_eval_examples)
    task_data = dataclasses.replace(task_data, task=s.configured(task_data.task))
    model = load_model(task_data.task, s)
    task = saved_label_order(model, task_data.task)
    if s.max_length > model.config.max_sequence_length:
        raise ConfigError(f"task.max_length={s.max_length} exceeds the longest sequence the model's positions hold "
                          f"({model.config.max_sequence_length} of max_position_embeddings "
                          f"{model.config.max_position_embeddings})")
    fs = s.feature_settings()
    train_features = make_features(task, model.tokenizer, task_data.train, fs, training=True)
    eval_features = {name: make_features(task, model.tokenizer, exs, fs, training=False)
                     for name, exs in task_data.evals.items()}
    boundaries = batching.fixed_length_boundaries(s.max_length) if s.pad_to_max else \
        batching.bucket_boundaries(s.max_length, s.bucket_min)
    pack = s.pack and not s.pad_to_max and task.spec.packs and batching.packable(train_features)
    if s.pack and not pack and not s.pad_to_max:
        log.warning("task.pack: %s (%s) is not a single-sequence task; batches are bucketed instead", task.name,
                    task.kind)
    return Prepared(task, model, task_data, train_features, eval_features, tuple(boundaries), pack)


def _schedule(cfg: FinetuneConfig, p: Prepared) -> tuple[run_config.RunConfig, int, int]:
    """(the loop's run config, steps per epoch, steps between evaluations)."""
    s, rc = cfg.task, cfg.run
    batch_size = rc.run.global_batch_size
    steps_per_epoch = (-(-len(p.train_features) // batch_size) if p.pack
                       else batching.num_batches(p.train_features, batch_size, p.boundaries))
    total_steps = max(1, math.ceil(s.epochs * steps_per_epoch))
    eval_every = max(1, steps_per_epoch // max(1, s.evals_per_epoch))
    n_evals = len(range(eval_every, total_steps + 1, eval_every)) + 1
    loop_cfg = dataclasses.replace(
        rc, model=p.model.config, data=dataclasses.replace(rc.data, seq_len=s.max_length),
        optim=dataclasses.replace(rc.optim, warmup_steps=int(s.warmup_ratio * total_steps)),
        run=dataclasses.replace(rc.run, steps=total_steps, eval_every=0),
        # every evaluated step stays restorable: a resumed run may need its best one back
        checkpoint=dataclasses.replace(rc.checkpoint, every=eval_every, keep=max(rc.checkpoint.keep, n_evals)))
    return loop_cfg, steps_per_epoch, eval_every


def _train_batches(cfg: FinetuneConfig, p: Prepared) -> BucketedBatches:
    s, rc = cfg.task, cfg.run
    if p.pack:
        data_shards = jax.device_count() // max(1, rc.mesh.resolve(jax.device_count())[2])
        return PackedBatches(p.train_features, rc.run.global_batch_size, min(s.pack_length, s.max_length),
                             rc.run.seed, data_shards)
    return BucketedBatches(p.train_features, rc.run.global_batch_size, p.boundaries, rc.run.seed)


def _prior_best(loop_cfg: run_config.RunConfig, out_dir: str) -> Optional[dict]:
    """best.json of an interrupted run this one resumes (its step still has a checkpoint), else None."""
    path = os.path.join(out_dir, "best.json")
    if not loop_cfg.checkpoint.resume or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        prior = json.load(f)
    checkpointer = Checkpointer(loop_cfg.checkpoint_dir(), keep=loop_cfg.checkpoint.keep, async_save=False)
    try:
        return prior if int(prior.get("step", -1)) in checkpointer.all_steps() else None
    finally:
        checkpointer.close()


def train_and_select(cfg: FinetuneConfig, p: Prepared) -> tuple[Best, BucketedBatches, float, int]:
    """Train with the shared loop, evaluating while it trains; (best, the batches, train seconds, steps)."""
    s, out_dir = cfg.task, cfg.run.run.output_dir
    loop_cfg, steps_per_epoch, eval_every = _schedule(cfg, p)
    config, head, num_labels = p.model.config, p.task.head, p.task.num_labels
    init_params = lambda r: init(config, r, head, num_labels)  # noqa: E731
    axes = logical_axes(config, head, num_labels)
    batches = _train_batches(cfg, p)
    log.info("%s: %d train features, %d steps/epoch, %d steps, %s, eval sets %s", p.task.name,
             len(p.train_features), steps_per_epoch, loop_cfg.run.steps,
             f"packed rows of {min(s.pack_length, s.max_length)}" if p.pack else f"buckets {list(p.boundaries)}",
             [f"{k}({len(v)})" for k, v in p.eval_features.items()])
    forward = predict.make_forward(config, head)
    evaluate = lambda params, step: evaluate_sets(p.task, p.task_data, p.eval_features, forward,  # noqa: E731
                                                  params, s, p.boundaries, cfg.run.run.progress, step)
    hook = SelectBest(eval_every, evaluate, p.task, out_dir, _prior_best(loop_cfg, out_dir))
    # the loop reports batch x seq_len tokens per second; with the mean real length per row that is
    # (up to the filler rows of short batches) the real-token throughput rather than max_length's
    mean_len = sum(batching.length_of(f) for f in p.train_features) / len(p.train_features)
    t0 = time.perf_counter()
    result = loop.train(loop_cfg, loop.Job(init_params, axes, make_loss_fn(p.task, config), batches, mean_len,
                                            initial_params=p.model.params), snapshots=hook)
    train_time = time.perf_counter() - t0
    if result.reason != "finished":
        raise RuntimeError(f"training stopped early ({result.reason}): {result.message}")
    best = hook.best
    if best.params is None:  # the best came before a resume: its checkpoint is the one read back
        checkpointer, target = _restore_target(loop_cfg, init_params, axes, loop_cfg.checkpoint_dir())
        try:
            params = jax.device_get(checkpointer.restore(best.step, target)[0].params)
        finally:
            checkpointer.close()
        best = Best(best.score, best.step, params, evaluate(params, best.step))
    return best, batches, train_time, loop_cfg.run.steps


def finetune(cfg: FinetuneConfig, task_data: Optional[TaskData] = None) -> FinetuneResult:
    """Fine-tune in steps: prepare the task and model, train with the shared loop while evaluating every
    `1/evals_per_epoch` epoch and keeping the best on the task's main metric, then write metrics, predictions
    and plots of each eval set, and the best model."""
    out_dir = cfg.run.run.output_dir
    os.makedirs(out_dir, exist_ok=True)
    p = prepare(cfg, task_data)
    best, batches, train_time, steps = train_and_select(cfg, p)
    summary = {name: r.metrics for name, r in best.results.items()}
    throughput = {"train_seconds": train_time, "steps": steps,
                  "real_tokens_per_sec": batches.real_tokens / train_time,
                  "padded_tokens_per_sec": batches.padded_tokens / train_time,
                  "pad_fraction": 1 - batches.real_tokens / max(batches.padded_tokens, 1)}
    for name, r in best.results.items():
        E.write_outputs(r, p.task, out_dir, name, extra={"best_step": best.step})
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"task": p.task.name, "main_metric": p.task.main_metric, "best_step": best.step, "eval": summary,
                   "train": throughput, "labels": list(p.task.labels or [])}, f, indent=2)
    with open(os.path.join(out_dir, "finetune_config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    if cfg.task.save_model:
        save_model(p.model, p.task, best.params, os.path.join(out_dir, "best_model"))
    return FinetuneResult(p.task, summary, best.step, train_time, throughput["real_tokens_per_sec"],
                          throughput["padded_tokens_per_sec"], out_dir, best.params)


def evaluate_sets(task: Task, task_data: TaskData, eval_features: Mapping[str, list], forward, params,
                  s: TaskSettings, boundaries, progress: bool, step: int = 0) -> dict[str, E.EvalResult]:
    """Every eval set through the model, scored with the task's metrics."""
    results = {}
    for name, feats in eval_features.items():
        outs = predict.run_model(forward, params, feats, s.eval_batch_size, boundaries, task.spec.sequence_outputs,
                           progress=progress, desc=f"eval {name} @{step}")
        results[name] = E.evaluate(task, task_data.evals[name], feats, outs, s.feature_settings().qa,
                                   ner_scheme=s.ner_scheme or None, version_2=s.version_2,
                                   head_params=params[task.head])
        results[name].real_tokens_per_sec = outs.real_tokens / outs.seconds
    return results


def evaluate_model(cfg: FinetuneConfig) -> dict[str, dict[str, float]]:
    """Evaluate a fine-tuned model directory on the task's eval sets (no training); writes the same
    per-set metrics, predictions and plots as `finetune`."""
    s, out_dir = cfg.task, cfg.run.run.output_dir
    td = load_task_data(s.configured(get_task(s.name)), s.data,
                        columns=Columns(s.text_column, s.text_pair_column, s.label_column),
                        with_train=False, max_eval=s.max_eval_examples)
    model = load_model(td.task, s)
    if model.report is not None and model.report.initialized:
        raise DataError(f"{s.model}: has no trained {td.task.head} head to evaluate")
    task = saved_label_order(model, td.task)
    feats = {name: make_features(task, model.tokenizer, exs, s.feature_settings(), training=False)
             for name, exs in td.evals.items()}
    results = evaluate_sets(task, td, feats, predict.make_forward(model.config, task.head), model.params, s,
                            batching.bucket_boundaries(s.max_length, s.bucket_min), cfg.run.run.progress)
    for name, r in results.items():
        E.write_outputs(r, task, out_dir, name)
    return {name: r.metrics for name, r in results.items()}


def _restore_target(cfg: run_config.RunConfig, init_params, axes, directory: str) -> tuple[Checkpointer, Any]:
    """The checkpointer of a loop run and the abstract train state (with shardings) to restore into."""
    engine = build_engine(cfg, Trained(init_params, axes, loss_fn=None), compile_step=False)
    return Checkpointer(directory, keep=cfg.checkpoint.keep, async_save=False), engine.target()


def is_pretraining_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.yaml")) and not os.path.isfile(os.path.join(path, "config.json"))


def load_pretraining_run(run_dir: str, head: str, num_labels: int, seed: int = 0) -> hf.PretrainedModel:
    """The encoder of the latest good checkpoint of a `python -m flaxbert.pretrain` run directory
    (config.yaml + checkpoints/), with a fresh `head`; the tokenizer is the run's `data.vocab` or
    the vocabulary it trained (`<run_dir>/vocab`)."""
    from flaxbert.vocab import load_tokenizer

    from flaxbert.train.pretraining import head_name

    cfg = run_config.load(os.path.join(run_dir, "config.yaml"))
    directory = cfg.checkpoint.directory or os.path.join(run_dir, "checkpoints")
    trained = head_name(cfg.data.nsp)
    # MLM-only runs made before they trained the masked-LM head alone hold the MLM + NSP head
    for tried in dict.fromkeys([trained, "pretraining"]):
        checkpointer, target = _restore_target(cfg, lambda r, h=tried: init(cfg.model, r, h),
                                               logical_axes(cfg.model, tried), directory)
        try:
            restored = checkpointer.restore_latest(target)
            break
        except CheckpointError:
            if tried == "pretraining":
                raise
        finally:
            checkpointer.close()
    if restored is None:
        raise DataError(f"{run_dir}: no checkpoint in {directory}")
    fresh = init(cfg.model, jax.random.key(seed), head, num_labels)
    params = {"bert": jax.device_get(restored[0].params["bert"]), head: fresh[head]}
    tokenizer = load_tokenizer(cfg.data.vocab or os.path.join(run_dir, "vocab"))
    report = hf.LoadReport(source=f"{directory}/{int(restored[0].step)}", missing=[],
                           initialized=[f"{head}/{name}" for name in _leaf_names(fresh[head])],
                           unexpected=[tried])
    return hf.PretrainedModel(cfg.model, params, tokenizer, head, report)


def _leaf_names(tree) -> list[str]:
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def save_model(model: hf.PretrainedModel, task: Task, params, out_dir: str) -> None:
    """A HF directory that `load_pretrained` and `flaxbert.pipeline` read back, with the label names."""
    extra = dict(model.hf_extra)
    if task.spec.names_labels and task.labels:
        extra["id2label"] = {str(i): name for i, name in enumerate(task.labels)}
        extra["label2id"] = {name: i for i, name in enumerate(task.labels)}
    extra["finetuning_task"] = task.name
    task.spec.save_model(dataclasses.replace(model, params=params, head=task.head, hf_extra=extra), out_dir)
