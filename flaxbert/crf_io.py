"""A CRF token-classification model on disk: the HF BertForTokenClassification directory of its encoder and
classifier (hf.py writes and reads it; transformers loads it as is) plus `crf.safetensors` beside it with the
CRF's transition, start and end scores and, in its metadata, whether decoding uses the BIO constraints."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from flaxbert import hf
from flaxbert.heads import CRF_PARAM_NAMES, CRF_SCALE, crf_params

FILE = "crf.safetensors"
HEAD = "token_classification_crf"
PLAIN_HEAD = "token_classification"  # the HF head the directory is saved as


def present(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, FILE))


def constrained(model_dir: str) -> bool:
    """Whether the saved CRF decodes with the BIO constraints (the fine-tuning default when not recorded)."""
    from safetensors import safe_open
    with safe_open(os.path.join(model_dir, FILE), framework="np") as f:
        return (f.metadata() or {}).get("constraints", "bio") == "bio"


def save_pretrained(model: hf.PretrainedModel, out_dir: str, *, constraints: bool) -> None:
    """The HF directory of the encoder and classifier, then crf.safetensors (the real scores, not the scaled
    parameters: see heads.CRF_SCALE)."""
    from safetensors.numpy import save_file
    head_params = model.params[HEAD]
    plain = {"bert": model.params["bert"], PLAIN_HEAD: {"classifier": head_params["classifier"]}}
    hf.save_pretrained(dataclasses.replace(model, params=plain, head=PLAIN_HEAD), out_dir)
    scores = {name: np.asarray(v, np.float32) for name, v in zip(CRF_PARAM_NAMES, crf_params(head_params))}
    tmp = os.path.join(out_dir, ".tmp-" + FILE)
    save_file(scores, tmp, metadata={"constraints": "bio" if constraints else "none"})
    os.replace(tmp, os.path.join(out_dir, FILE))


def load_pretrained(path: str, num_labels: Optional[int] = None, *, on_head_mismatch: str = "reinit",
                    **kwargs) -> hf.PretrainedModel:
    """`hf.load_pretrained` with the CRF head: the classifier from the HF directory, the CRF scores from
    crf.safetensors when it is there and of the classifier's width (else zeros, listed as initialised; a file
    of another width with on_head_mismatch="error" is refused)."""
    from safetensors.numpy import load_file
    model = hf.load_pretrained(path, head=PLAIN_HEAD, num_labels=num_labels, on_head_mismatch=on_head_mismatch,
                               **kwargs)
    head_params = dict(model.params[PLAIN_HEAD])
    n = int(head_params["classifier"]["kernel"].shape[-1])
    shapes = {"transitions": (n, n), "start": (n,), "end": (n,)}
    saved = load_file(os.path.join(path, FILE)) if present(path) else {}
    initialized = []
    for name, shape in shapes.items():
        value = saved.get(name)
        if value is not None and value.shape != shape and on_head_mismatch == "error":
            raise hf.HFLoadError(f"{os.path.join(path, FILE)}: {name} has shape {value.shape}, the classifier "
                                 f"needs {shape}")
        if value is None or value.shape != shape:
            initialized.append(f"{HEAD}/{name}")
            value = np.zeros(shape, np.float32)
        head_params[name] = np.asarray(value, np.float32) / CRF_SCALE
    report = model.report
    if report is not None:
        report = dataclasses.replace(report, initialized=[s.replace(PLAIN_HEAD + "/", HEAD + "/", 1)
                                                          for s in report.initialized] + initialized)
    params = {"bert": model.params["bert"], HEAD: head_params}
    return dataclasses.replace(model, params=params, head=HEAD, report=report)
