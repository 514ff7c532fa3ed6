"""The composed, frozen run configuration: YAML files in `configs/` plus dotted CLI overrides.

`RunConfig()` with no arguments is the demo (tiny model on the packaged corpus). A YAML file names
sections (`model`, `data`, `optim`, `mesh`, `run`, `checkpoint`); `--section.key=value` overrides
any field. Unknown keys are an error naming the key and the nearest valid one. `validate_for_run`
checks the settings that need the device count or the vocabulary, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Mapping, Optional, Sequence

import yaml

from flaxbert.config import BertConfig
from flaxbert.data.shards import PrepareSettings
from flaxbert.errors import ConfigError, DataError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from. Empty paths mean: the corpus shipped in the package, a vocabulary
    trained on the spot, and prepared dirs under `run.output_dir` (reused when a run resumes)."""

    corpus: str = ""  # corpus spec(s) for flaxbert.data, comma separated; "" = the packaged meditations.txt
    format: str = ""  # corpus format (bert, lines, wikitext, jsonl, ...); "" = guess from the name
    vocab: str = ""  # tokenizer dir / vocab.txt; "" = train a WordPiece vocab of model.vocab_size tokens
    prepared_dir: str = ""  # already prepared data (`flaxbert.data prepare`); "" = prepare the corpus
    eval_prepared_dir: str = ""  # held-out prepared data; "" = hold out eval_fraction of the corpus documents
    eval_fraction: float = 0.05
    seq_len: int = 64
    max_predictions_per_seq: int = 10
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 1
    whole_word_masking: bool = False
    masking: str = "dynamic"  # static (masks written by prepare) | dynamic (new masks every epoch)
    packed: bool = False  # pack several instances per row
    nsp: bool = True  # next-sentence prediction (sentence pairs); False: MLM only on single-segment rows
    # A sequence-length schedule in one run, as BERT's phases 1 and 2: > 0 trains the first `short_share` of the
    # run (of run.steps, or of a budget run's time) on rows of this many tokens, then on rows of `seq_len`; one
    # learning-rate schedule and optimizer state over both. Held-out evaluation is at `seq_len` throughout.
    short_seq_len: int = 0
    short_share: float = 0.0
    short_prepared_dir: str = ""  # with `prepared_dir`: the data prepared at short_seq_len; "" = prepared here
    lowercase: bool = True  # for a vocabulary trained on the spot
    seed: int = 12345  # data order and masking; independent of run.seed
    loader_processes: int = 0  # > 0: training batches made in this many worker processes (GIL-free; each
    # opens the data itself); 0: in two threads of the training process. Batches are the same either way.

    @property
    def short_max_predictions(self) -> int:
        """Masked positions per short row: `max_predictions_per_seq` scaled to `short_seq_len` (BERT's phase 1
        makes 20 at 128 tokens for phase 2's 80 at 512)."""
        return max(1, round(self.max_predictions_per_seq * self.short_seq_len / self.seq_len))

    def short_prepare_settings(self) -> PrepareSettings:
        """The settings of the short rows of a sequence-length schedule (`short_seq_len` > 0)."""
        return dataclasses.replace(self.prepare_settings(), max_seq_length=self.short_seq_len,
                                   max_predictions_per_seq=self.short_max_predictions)

    def prepare_settings(self) -> PrepareSettings:
        """The settings `flaxbert.data.prepare` makes instances with (checked there, in one place)."""
        return PrepareSettings(max_seq_length=self.seq_len, max_predictions_per_seq=self.max_predictions_per_seq,
                               masked_lm_prob=self.masked_lm_prob, short_seq_prob=self.short_seq_prob,
                               dupe_factor=self.dupe_factor, whole_word_masking=self.whole_word_masking,
                               seed=self.seed, nsp=self.nsp)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW as BERT uses it (eps 1e-6, decay 0.01, none on LayerNorm/biases) or LAMB; warmup + decay."""

    name: str = "adamw"  # adamw | lamb
    lr: float = 2e-3
    end_lr: float = 0.0
    warmup_steps: int = 60
    warmup_fraction: float = 0.0  # runs on a time budget: > 0 warms up over this share of the budget instead
    # (of the time after the first step has compiled and run: the budget's schedule starts there)
    decay: str = "linear"  # linear | polynomial | constant
    power: float = 1.0  # polynomial decay power (1.0 == linear)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    freeze_encoder: bool = False  # train only the head (the `bert` subtree gets zero updates)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ('data', 'fsdp', 'tensor'); -1 on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, device_count: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        names = ("data", "fsdp", "tensor")
        for name, size in zip(names, sizes):
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name} must be a positive integer or -1, got {size}")
        if sizes.count(-1) > 1:
            raise ConfigError("only one of mesh.data/fsdp/tensor may be -1")
        known = 1
        for size in sizes:
            if size != -1:
                known *= size
        if -1 in sizes:
            if device_count % known:
                raise ConfigError(f"mesh {dict(zip(names, sizes))}: {device_count} devices are not divisible by "
                                  f"the fixed axes' product {known}")
            sizes[sizes.index(-1)] = device_count // known
        if sizes[0] * sizes[1] * sizes[2] != device_count:
            raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                              f"{sizes[0] * sizes[1] * sizes[2]} devices, but {device_count} are available")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    directory: str = ""  # "" = <run.output_dir>/checkpoints; may be gs://... (shared by all hosts of a pod)
    every: int = 300  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # keep the last K
    async_save: bool = True
    resume: bool = True  # resume from the latest good checkpoint in run.output_dir


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The loop: how long, how big, where to, how often to log and evaluate."""

    output_dir: str = "runs/tiny"
    steps: int = 600  # optimizer steps; with budget_minutes, the most steps the budget may take
    budget_minutes: float = 0.0  # > 0: train for this much wall time; the LR decays on elapsed time, not steps
    global_batch_size: int = 32  # sequences per optimizer step, over all hosts and microbatches
    grad_accum: int = 1  # microbatches per step
    seed: int = 0  # parameter init and dropout
    step_impl: str = "sharded"  # sharded (jit over a mesh) | pmap (classic data parallel)
    log_every: int = 20
    eval_every: int = 300  # 0 disables held-out evaluation
    eval_batches: int = 8
    nan_policy: str = "stop"  # stop | skip (skip leaves the state unchanged for a non-finite step)
    spike_factor: float = 0.0  # > 0: a loss above this many times the median of the last 100 logged-finite steps,
    spike_steps: int = 3  # ... this many steps in a row, is divergence: the run stops (nan_policy=stop) or warns
    init_from: str = ""  # HF checkpoint dir to continue pretraining from (model config taken from it)
    export_hf: str = ""  # pretraining: when the run finishes, write the model and tokenizer here as an HF directory
    overwrite: bool = False  # delete output_dir's prepared data, vocabulary, checkpoints and metrics first
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look up the device in the table
    progress: bool = True  # tqdm progress bar on process 0
    prefetch: int = 2  # batches put on the devices ahead of the step (0: each batch is sent when it is used)
    coordinator_address: str = ""  # multi-host outside TPU VMs: host:port of process 0
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: BertConfig = BertConfig.tiny(vocab_size=2048, max_position_embeddings=128)
    data: DataConfig = DataConfig(nsp=False)  # the demo trains MLM only (configs/tiny.yaml says why)
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunSettings = RunSettings()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self):
        self._check_static()

    def _check_static(self) -> None:
        o, r, d = self.optim, self.run, self.data
        choices = {("optim", "name"): ("adamw", "lamb"), ("optim", "decay"): ("linear", "polynomial", "constant"),
                   ("run", "step_impl"): ("sharded", "pmap"), ("run", "nan_policy"): ("stop", "skip"),
                   ("data", "masking"): ("static", "dynamic")}
        for (section, key), allowed in choices.items():
            value = getattr(getattr(self, section), key)
            if value not in allowed:
                raise ConfigError(f"{section}.{key}={value!r} is not one of {allowed}")
        positive = {"run.steps": r.steps, "run.global_batch_size": r.global_batch_size,
                    "run.grad_accum": r.grad_accum, "run.log_every": r.log_every,
                    "checkpoint.every": self.checkpoint.every, "checkpoint.keep": self.checkpoint.keep}
        if r.prefetch < 0:
            raise ConfigError(f"run.prefetch must be >= 0, got {r.prefetch}")
        if not (r.spike_factor == 0 or 1 < r.spike_factor < float("inf")) or r.spike_steps < 1:
            raise ConfigError(f"run.spike_factor must be 0 (off) or > 1 and run.spike_steps >= 1, got "
                              f"{r.spike_factor} and {r.spike_steps}")
        if not 0 <= r.budget_minutes < float("inf"):  # written so that NaN fails too
            raise ConfigError(f"run.budget_minutes must be >= 0 (0: no budget), got {r.budget_minutes}")
        if not 0 <= o.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction must be in [0, 1), got {o.warmup_fraction}")
        if o.warmup_fraction and not r.budget_minutes:
            raise ConfigError("optim.warmup_fraction is a share of run.budget_minutes, which is not set; "
                              "use optim.warmup_steps for a run of run.steps")
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if not (0 < o.lr < float("inf")) or o.warmup_steps < 0 or not (0 <= o.clip_norm < float("inf")) or \
                not (0 <= o.weight_decay < float("inf")):  # written so that NaN fails too
            raise ConfigError(f"optim: lr must be > 0 and warmup_steps, clip_norm, weight_decay >= 0 "
                              f"(got lr={o.lr}, warmup_steps={o.warmup_steps}, clip_norm={o.clip_norm}, "
                              f"weight_decay={o.weight_decay})")
        if r.global_batch_size % r.grad_accum:
            raise ConfigError(f"run.global_batch_size={r.global_batch_size} is not divisible by "
                              f"run.grad_accum={r.grad_accum}")
        if d.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len={d.seq_len} is longer than model.max_position_embeddings="
                              f"{self.model.max_position_embeddings}")
        if not 0 <= d.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
        try:
            d.prepare_settings()  # the instance settings' own checks (max_seq_length, masked_lm_prob, ...)
        except DataError as e:
            raise ConfigError(f"data: {e}") from None
        if d.loader_processes < 0:
            raise ConfigError(f"data.loader_processes must be >= 0, got {d.loader_processes}")
        self._check_short_rows()

    def _check_short_rows(self) -> None:
        d = self.data
        if not d.short_seq_len:
            if d.short_share or d.short_prepared_dir:
                raise ConfigError("data.short_share and data.short_prepared_dir belong to a sequence-length "
                                  "schedule, which data.short_seq_len=0 turns off; set data.short_seq_len")
            return
        if not 0 < d.short_seq_len < d.seq_len:
            raise ConfigError(f"data.short_seq_len={d.short_seq_len} must be between 0 and data.seq_len="
                              f"{d.seq_len} (the rows of the run's second phase)")
        if not 0 < d.short_share < 1:  # written so that NaN fails too
            raise ConfigError(f"data.short_share={d.short_share} must be in (0, 1): the share of the run trained on "
                              f"rows of data.short_seq_len={d.short_seq_len} tokens")
        if d.prepared_dir and not d.short_prepared_dir:
            raise ConfigError(f"data.prepared_dir is given, so the rows of data.short_seq_len={d.short_seq_len} "
                              "tokens must be prepared too: pass data.short_prepared_dir")
        if d.short_prepared_dir and not d.prepared_dir:
            raise ConfigError("data.short_prepared_dir is given without data.prepared_dir; give both, or neither "
                              "to prepare the corpus here")
        try:
            d.short_prepare_settings()
        except DataError as e:
            raise ConfigError(f"data (short rows): {e}") from None

    def checkpoint_dir(self) -> str:
        """Where this run's checkpoints live: checkpoint.directory, or <run.output_dir>/checkpoints."""
        return self.checkpoint.directory or os.path.join(self.run.output_dir, "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTION_TYPES = {"model": BertConfig, "data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig,
                  "run": RunSettings, "checkpoint": CheckpointConfig}
# `model.preset` picks the BertConfig preset that the other model keys override.
_EXTRA_KEYS = {"model": ("preset",)}


def valid_keys() -> list[str]:
    keys = []
    for section, cls in _SECTION_TYPES.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
        keys += [f"{section}.{k}" for k in _EXTRA_KEYS.get(section, ())]
    return keys


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type; error naming the key otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        annotation = args[0]
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _fields(cls) -> dict:
    """{field name: its type} (resolved: the modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def _model_from(values: Mapping[str, Any], base: BertConfig) -> BertConfig:
    values = dict(values)
    preset = values.pop("preset", None)
    fields = _fields(BertConfig)
    for key in values:
        if key not in fields:
            raise _unknown(f"model.{key}")
    typed = {k: _coerce(f"model.{k}", v, fields[k]) for k, v in values.items()}
    if preset is not None:
        return BertConfig.preset(str(preset), **typed)
    return base.replace(**typed)


def section_from_dict(section: str, values: Mapping[str, Any], base: Any) -> Any:
    """A section's frozen dataclass `base` with `values` applied: every key must be one of its fields (else an
    error naming the nearest valid key) and every value is converted to the field's type; the dataclass's own
    `__post_init__` validates the result. Used for run_config's sections and for other entry points' own
    (fine-tuning's `task`)."""
    fields = _fields(type(base))
    for key in values:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            raise ConfigError(f"unknown config key '{section}.{key}'" + (
                f"; did you mean '{section}.{near[0]}'?" if near else f"; valid: {sorted(fields)}"))
    return dataclasses.replace(base, **{k: _coerce(f"{section}.{k}", v, fields[k]) for k, v in values.items()})


def merge_sources(defaults: Mapping[str, Mapping], sources: Sequence[Mapping]) -> dict:
    """{section: {key: value}} trees merged in order (later ones win key by key)."""
    merged: dict = {k: dict(v) for k, v in defaults.items()}
    for src in sources:
        for section, values in src.items():
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
            merged.setdefault(section, {}).update(values)
    return merged


def from_dict(tree: Mapping[str, Any], base: Optional[RunConfig] = None) -> RunConfig:
    """Apply a nested {section: {key: value}} mapping on top of `base` (default: the demo)."""
    base = base or RunConfig()
    if not isinstance(tree, Mapping):
        raise ConfigError(f"a run config must be a mapping of sections, got {type(tree).__name__}")
    sections = {}
    for section, values in tree.items():
        if section not in _SECTION_TYPES:
            first = next(iter(values), None) if isinstance(values, Mapping) else None
            raise _unknown(f"{section}.{first}" if first is not None else str(section))
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        if section == "model":
            sections["model"] = _model_from(values, base.model)
            continue
        fields = _fields(_SECTION_TYPES[section])
        for key in values:
            if key not in fields:
                raise _unknown(f"{section}.{key}")
        sections[section] = section_from_dict(section, values, getattr(base, section))
    return dataclasses.replace(base, **sections)


def resolve_config_path(name: str) -> str:
    """A path, or a name in configs/ (`bert_base_phase1` -> configs/bert_base_phase1.yaml)."""
    candidates = [name, os.path.join("configs", name), os.path.join(CONFIG_DIR, name)]
    candidates += [c + ".yaml" for c in candidates]
    for path in candidates:
        if os.path.isfile(path):
            return path
    names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) if os.path.isdir(CONFIG_DIR) else []
    raise ConfigError(f"config {name!r} not found (looked in ./, ./configs/ and {CONFIG_DIR}; known: {names})")


def load_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return tree


def parse_overrides(args: Sequence[str]) -> dict:
    """['--optim.lr=1e-4', '--mesh.data', '8'] -> {'optim': {'lr': 1e-4}, 'mesh': {'data': 8}}."""
    tree: dict = {}
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} has no value (use --{key}=VALUE)")
            value = args[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if "." not in key:
            raise _unknown(key)
        section, _, field = key.partition(".")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        tree.setdefault(section, {})[field] = parsed
    return tree


def load(config: str = "", overrides: Sequence[str] = ()) -> RunConfig:
    """The demo defaults, then the YAML file (if any), then the CLI overrides."""
    cfg = RunConfig()
    if config:
        cfg = from_dict(load_yaml(resolve_config_path(config)), cfg)
    return from_dict(parse_overrides(overrides), cfg)


def validate_for_run(cfg: RunConfig, device_count: int, vocab_size: Optional[int] = None,
                     process_count: int = 1) -> tuple[int, int, int]:
    """Checks that need the devices or the vocabulary; returns the resolved mesh (data, fsdp, tensor)."""
    data, fsdp, tensor = cfg.mesh.resolve(device_count)
    r = cfg.run
    if r.step_impl == "pmap" and (fsdp, tensor) != (1, 1):
        raise ConfigError(f"run.step_impl=pmap is data-parallel only; mesh.fsdp={fsdp} and mesh.tensor={tensor} "
                          f"must be 1")
    if r.step_impl == "pmap" and process_count > 1:
        raise ConfigError(f"run.step_impl=pmap runs on one host in the training loop ({process_count} processes "
                          f"here); use run.step_impl=sharded")
    if r.global_batch_size % process_count:
        raise ConfigError(f"run.global_batch_size={r.global_batch_size} is not divisible by the {process_count} "
                          f"processes (each feeds an equal share)")
    data_parallel = data * fsdp
    micro = r.global_batch_size // r.grad_accum
    if micro % data_parallel:
        raise ConfigError(f"run.global_batch_size={r.global_batch_size} / run.grad_accum={r.grad_accum} = {micro} "
                          f"sequences per microbatch is not divisible by the data-parallel size "
                          f"mesh.data x mesh.fsdp = {data_parallel}")
    if vocab_size is not None:
        check_vocab_size(cfg, vocab_size)
    return data, fsdp, tensor


def check_vocab_size(cfg: RunConfig, vocab_size: int) -> None:
    if vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the vocabulary has {vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
                          f"set --model.vocab_size={vocab_size} (or larger)")


def save(cfg: RunConfig, path: str) -> None:
    """Write the resolved config (loadable with `load(path)`)."""
    from etils import epath

    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(cfg.to_yaml())
