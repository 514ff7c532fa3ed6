"""Feature extraction: a frozen encoder turns sentences into embeddings (mean of the real tokens'
last hidden states, the pooler output, or the [CLS] state) and scikit-learn's logistic regression is
trained on them. Writes a metrics JSON, a per-class report and the confusion-matrix PNG.

"pooled" is the pooler's dense+tanh output, and only a family with a pooler (BERT) has one: for another
(DistilBERT) it is refused rather than quietly replaced by the [CLS] state, which is "cls"."""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxbert import hf
from flaxbert import scores as M
from flaxbert.errors import ConfigError, DataError
from flaxbert.infer import batching
from flaxbert.infer import predict
from flaxbert.finetune import evaluate as E
from flaxbert.finetune.task_data import Columns, load_task_data, make_features
from flaxbert.finetune.kinds.classification import Classification, task_scores
from flaxbert.finetune.tasks import get_task
from flaxbert.model import encode

POOLINGS = ("mean", "pooled", "cls")


def check_pooling(config, pooling: str) -> None:
    """A ConfigError for a pooling `config`'s family cannot give (an unknown one, or "pooled" without a pooler)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "pooled" and not config.family.pooler:
        raise ConfigError(f"pooling 'pooled' needs the encoder's pooler, and model_type {config.model_type!r} has "
                          f"none; use 'cls' (the [CLS] hidden state) or 'mean' (the mean over real tokens)")


def make_embed(config, pooling: str):
    check_pooling(config, pooling)

    @jax.jit
    def embed(params, batch):
        out = encode(params, batch, config)
        if pooling == "pooled":
            return (out.pooled_output,)
        if pooling == "cls":
            return (out.last_hidden_state[:, 0],)
        mask = batch["attention_mask"][..., None].astype(jnp.float32)
        return (jnp.sum(out.last_hidden_state * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0),)
    return embed


def embed_features(model: hf.PretrainedModel, features: Sequence[dict], pooling: str = "mean",
                   batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """[N, hidden] float32 embeddings, in the order of `features`."""
    embed = make_embed(model.config, pooling)
    params = {"bert": model.params["bert"]}
    outs = predict.run_model(embed, params, features, batch_size, batching.bucket_boundaries(max_length), seq_outputs=False)
    return np.stack([r[0] for r in outs.rows]).astype(np.float32)


def extract_and_fit(cfg, pooling: str = "mean") -> dict:
    """Embeddings of the train and eval sets with the frozen encoder, a logistic regression on the
    train embeddings, and its metrics on each eval set (files in run.output_dir)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import classification_report

    s, out_dir = cfg.task, cfg.run.run.output_dir
    task = get_task(s.name)
    if not isinstance(task.spec, Classification):  # a probe on [CLS]/mean embeddings predicts one class
        raise DataError(f"feature extraction is for classification tasks; {task.name} is {task.kind}")
    td = load_task_data(task, s.data, columns=Columns(s.text_column, s.text_pair_column, s.label_column),
                        max_train=s.max_train_examples, max_eval=s.max_eval_examples)
    task = td.task
    model = hf.load_pretrained(s.model, head=None)
    check_pooling(model.config, pooling)  # before any embedding is computed
    if model.tokenizer is None:
        raise DataError(f"{s.model}: no tokenizer files in the model directory")
    fs = s.feature_settings()
    train_f = make_features(task, model.tokenizer, td.train, fs, training=True)
    x_train = embed_features(model, train_f, pooling, s.eval_batch_size, s.max_length)
    y_train = np.array([f["label"] for f in train_f])
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(x_train, y_train)
    report = {"task": task.name, "pooling": pooling, "model": s.model, "train_examples": len(train_f), "metrics": {}}
    os.makedirs(out_dir, exist_ok=True)
    for name, examples in td.evals.items():
        feats = make_features(task, model.tokenizer, examples, fs, training=False)
        x = embed_features(model, feats, pooling, s.eval_batch_size, s.max_length)
        probs = clf.predict_proba(x)
        pred = clf.classes_[probs.argmax(-1)]
        preds = [{"where": ex.where, "label": task.labels[p], "score": float(pr.max())}
                 for ex, p, pr in zip(examples, pred, probs)]
        if "label" not in feats[0]:
            report["metrics"][name] = {}
            E.write_outputs(E.EvalResult({}, preds), task, out_dir, name)
            continue
        gold = np.array([f["label"] for f in feats])
        result = E.EvalResult(task_scores(task, gold, pred, task.num_labels), preds,
                              M.confusion_matrix(gold, pred, task.num_labels))
        E.write_outputs(result, task, out_dir, name, extra={"pooling": pooling})
        text = classification_report(gold, pred, labels=list(range(task.num_labels)),
                                     target_names=list(task.labels), zero_division=0, digits=4)
        with open(os.path.join(out_dir, f"{name}_report.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        report["metrics"][name] = result.metrics
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report
