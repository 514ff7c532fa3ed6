"""The checks every model family's tests run against transformers (tests/test_distilbert.py, test_roberta.py,
test_electra.py): a checkpoint written by HF's PyTorch or Flax class loads with no missing, unexpected or
re-initialised tensors and gives HF's outputs on a padded batch; flaxbert's save loads back in both."""

import json

import jax
import numpy as np

import flaxbert
from flaxbert.hf import load_pretrained, save_pretrained

# HF class-name suffix -> flaxbert head (None: the bare encoder), for the heads every family has
HEADS = {
    "Model": None,
    "ForMaskedLM": "masked_lm",
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
    "ForMultipleChoice": "multiple_choice",
}


def perturbed_torch(pt_model, seed):
    """HF initialises biases to 0 and LayerNorms to 1, under which a swapped bias or norm would go unseen."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pt_model.parameters():  # tied weights appear once
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return pt_model


def perturbed_flax(hf_model, seed):
    leaves, treedef = jax.tree.flatten(hf_model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    hf_model.params = jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    return hf_model


def torch_outputs(pt_model, batch):
    import torch

    with torch.no_grad():
        return pt_model.eval()(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})


def ours(model, batch) -> dict:
    """(name, array) of flaxbert's outputs for `model`'s head; the base model's at unpadded positions only."""
    head = model.head
    if head is None:
        out = flaxbert.encode(model.params, batch, model.config)
        assert (out.pooled_output is None) == (not model.config.family.pooler)
        return {"last_hidden_state": np.asarray(out.last_hidden_state)[batch["attention_mask"].astype(bool)]}
    out = flaxbert.apply_head(model.params, batch, model.config)
    if head == "question_answering":
        return {"start_logits": np.asarray(out.start_logits), "end_logits": np.asarray(out.end_logits)}
    return {"logits": np.asarray(out.mlm_logits if head == "masked_lm" else out.logits)}


def theirs(ref, head, batch) -> dict:
    if head is None:
        return {"last_hidden_state": np.asarray(ref.last_hidden_state)[batch["attention_mask"].astype(bool)]}
    if head == "question_answering":
        return {"start_logits": np.asarray(ref.start_logits), "end_logits": np.asarray(ref.end_logits)}
    return {"logits": np.asarray(ref.logits)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def loaded_clean(path, model_type: str, head):
    """flaxbert's model of an HF directory, checked to load every tensor and nothing else."""
    model = load_pretrained(str(path), head="auto")
    assert model.config.model_type == model_type and model.head == head
    assert model.report.missing == [] and model.report.unexpected == [] and model.report.initialized == []
    return model


def check_against(hf_model, path, model_type: str, head, batch, *, flax: bool, tol: float = 1e-4) -> float:
    """Save `hf_model` (perturbed) to `path`, load it with flaxbert; the largest difference from HF's outputs."""
    hf_model.save_pretrained(path)
    model = loaded_clean(path, model_type, head)
    reference = hf_model(**batch) if flax else torch_outputs(hf_model, batch)
    diff = max_diff(ours(model, batch), theirs(reference, head, batch))
    assert diff <= tol, (head, diff)
    return diff


def check_round_trip(model, out_dir, pt_class, flax_class, batch, tol: float = 1e-5) -> dict:
    """flaxbert's save of `model` loads in transformers' PyTorch and Flax classes with no missing, unexpected or
    mismatched keys and their outputs, and back in flaxbert bit for bit; returns the written config.json."""
    save_pretrained(model, str(out_dir))
    pt_model, info = pt_class.from_pretrained(str(out_dir), output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    assert max_diff(ours(model, batch), theirs(torch_outputs(pt_model, batch), model.head, batch)) <= tol
    flax_model = flax_class.from_pretrained(str(out_dir))
    assert max_diff(ours(model, batch), theirs(flax_model(**batch), model.head, batch)) <= tol
    again = load_pretrained(str(out_dir), head="auto")
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return json.loads((out_dir / "config.json").read_text())


def check_torch_class(cls, hf_config, path, model_type: str, head, batch, seed: int = 0) -> float:
    """`check_against` for a perturbed random model of transformers' PyTorch class `cls`."""
    import torch

    torch.manual_seed(seed)
    return check_against(perturbed_torch(cls(hf_config), seed), path, model_type, head, batch, flax=False)


def check_flax_class(cls, hf_config, path, model_type: str, head, batch, seed: int = 0) -> float:
    """`check_against` for a perturbed random model of transformers' Flax class `cls`."""
    return check_against(perturbed_flax(cls(hf_config, seed=seed), seed), path, model_type, head, batch, flax=True)


def round_trip_from(pt_class, flax_class, hf_config, tmp_path, model_type: str, head, batch, seed: int = 1) -> dict:
    """A perturbed random `pt_class` model loaded by flaxbert, then `check_round_trip`; the config.json written."""
    import torch

    torch.manual_seed(seed)
    perturbed_torch(pt_class(hf_config), seed).save_pretrained(tmp_path / "hf")
    model = loaded_clean(tmp_path / "hf", model_type, head)
    return check_round_trip(model, tmp_path / "ours", pt_class, flax_class, batch)


def byte_level_bpe_tokenizer(model_max_length: int, vocab_size: int = 400):
    """RoBERTa's kind of tokenizer, trained here: byte-level BPE on the packaged Meditations."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    from flaxbert.train.pretraining import packaged_corpus

    bpe = ByteLevelBPETokenizer()
    bpe.train([packaged_corpus()], vocab_size=vocab_size, min_frequency=2,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return transformers.RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                             sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                             mask_token="<mask>", model_max_length=model_max_length)


def train_wordpiece_vocab(out, data_dir) -> None:
    """A 1,000-piece uncased WordPiece vocabulary of emotion sentences and CoNLL-2003 words, written as
    `out/vocab.txt` (for the families whose tokenizer is WordPiece: DistilBERT, ELECTRA)."""
    from tokenizers import BertWordPieceTokenizer

    texts = [line.rsplit(";", 1)[0] for line in (data_dir / "emotion" / "train.txt").read_text().splitlines()[:2000]]
    texts += [line.split(" ")[0] for line in (data_dir / "conll2003" / "train.txt").read_text().splitlines()[:20000]
              if line.strip()]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=1000, min_frequency=2,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    out.mkdir(parents=True, exist_ok=True)
    wordpiece.save_model(str(out))


def run_finetune_cli(args, out, timeout: int = 300):
    """`python -m flaxbert.finetune ARGS` for one quick epoch (64 training examples, 32 per eval set, batch 16,
    lr 1e-3) into `out`, from this checkout; asserts it succeeded."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "flaxbert.finetune", *args, "--output-dir", str(out), "--epochs", "1",
                           "--max-train-examples", "64", "--max-eval-examples", "32", "--no-progress",
                           "--run.global_batch_size=16", "--optim.lr=1e-3"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
