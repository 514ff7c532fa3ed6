"""Continued MLM pretraining (`--init_from`) from DistilBERT, RoBERTa and ELECTRA checkpoints written by
transformers: the run trains the masked-LM head alone with the checkpoint's own tokenizer, its first loss
equals transformers' masked-LM loss on the same batch, and `run.export_hf` writes the trained model as a
directory transformers loads with no missing keys and the same loss."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from flaxbert import hf
from flaxbert import run_config as rc
from flaxbert.errors import ConfigError
from flaxbert.train import loop, pretraining
from flaxbert.train.writer import read_jsonl
from family_parity import perturbed_torch

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)


def _wordpiece():
    """The demo's shipped 2,048-token WordPiece vocabulary, as a tokenizer."""
    from flaxbert.vocab import load_tokenizer

    where = tempfile.mkdtemp()
    shutil.copy(pretraining.packaged_vocab(2048, True), os.path.join(where, "vocab.txt"))
    return load_tokenizer(where)


def _bpe():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train([pretraining.packaged_corpus()], vocab_size=500, min_frequency=2,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return transformers.RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                             sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                             pad_token="<pad>", mask_token="<mask>", model_max_length=64)


def _distilbert(n):
    return transformers.DistilBertConfig(vocab_size=n, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                         max_position_embeddings=64)


FAMILIES = {  # name: (tokenizer, config, masked-LM class)
    "distilbert": (_wordpiece, _distilbert, "DistilBertForMaskedLM"),
    "roberta": (_bpe, lambda n: transformers.RobertaConfig(vocab_size=n, type_vocab_size=1, **SMALL),
                "RobertaForMaskedLM"),
    "electra": (_wordpiece, lambda n: transformers.ElectraConfig(vocab_size=n, embedding_size=24, **SMALL),
                "ElectraForMaskedLM"),
}


def _checkpoint(tmp_path, name):
    make_tokenizer, make_config, cls = FAMILIES[name]
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = perturbed_torch(getattr(transformers, cls)(make_config(len(tok))), 1)
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return tmp_path / name, getattr(transformers, cls)


def _overrides(tmp_path, init_from, steps=6):
    return [f"--run.init_from={init_from}", f"--run.output_dir={tmp_path / 'run'}", f"--run.steps={steps}",
            "--run.global_batch_size=8", "--run.log_every=1", "--run.eval_every=0", "--run.progress=false",
            "--data.seq_len=32", "--data.max_predictions_per_seq=5", "--optim.lr=3e-3", "--optim.warmup_steps=0",
            "--checkpoint.every=100", f"--run.export_hf={tmp_path / 'export'}", "--data.nsp=true"]


def _torch_mlm_loss(pt_model, batch, model_type):
    """transformers' masked-LM loss (mean cross-entropy over the masked positions) on a flaxbert batch."""
    ids = np.asarray(batch["input_ids"])
    labels = np.full(ids.shape, -100)
    rows = np.arange(len(ids))[:, None].repeat(batch["masked_lm_positions"].shape[1], 1)
    real = np.asarray(batch["masked_lm_weights"]) > 0
    labels[rows[real], np.asarray(batch["masked_lm_positions"])[real]] = np.asarray(batch["masked_lm_ids"])[real]
    inputs = {"input_ids": torch.tensor(ids, dtype=torch.long),
              "attention_mask": torch.tensor(np.asarray(batch["attention_mask"]), dtype=torch.long),
              "labels": torch.tensor(labels)}
    with torch.no_grad():
        return float(pt_model.eval()(**inputs).loss)


def _our_mlm_loss(config, params, batch):
    out = pretraining.make_loss_fn(config, nsp=False)(params, batch, None)
    total, weight = out.terms["mlm"]
    return float(total / weight)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_continued_pretraining_from_a_checkpoint_of_each_family(tmp_path, name):
    ckpt, pt_class = _checkpoint(tmp_path, name)
    cfg, task = pretraining.build_task(rc.load("", _overrides(tmp_path, ckpt)))
    assert cfg.data.nsp is False  # these families have no next-sentence head: MLM only, without being told
    assert cfg.data.vocab == str(ckpt) and cfg.model.model_type == name
    assert list(task.initial_params) == ["bert", "masked_lm"]

    batch = next(task.train_batches)
    assert int(np.asarray(batch["input_ids"])[:, 0].min()) == hf.load_pretrained(ckpt).tokenizer.cls_token_id
    reference = pt_class.from_pretrained(ckpt)
    np.testing.assert_allclose(_our_mlm_loss(cfg.model, task.initial_params, batch),
                               _torch_mlm_loss(reference, batch, name), rtol=1e-5)

    result = loop.train(cfg, task, snapshots=pretraining.ExportHF(cfg, str(tmp_path / "export")))
    assert result.reason == "finished" and result.step == 6
    losses = [r["mlm_loss"] for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "train"]
    assert len(losses) == 6 and all(np.isfinite(losses))

    exported, info = pt_class.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    trained = hf.load_pretrained(tmp_path / "export", head="masked_lm")
    assert trained.tokenizer is not None and len(trained.tokenizer) == len(hf.load_pretrained(ckpt).tokenizer)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                         trained.params, task.initial_params))
    assert max(moved) > 1e-4  # the export holds the trained weights, not the starting ones
    np.testing.assert_allclose(_our_mlm_loss(cfg.model, trained.params, batch),
                               _torch_mlm_loss(exported, batch, name), rtol=1e-5)


def test_the_cli_continues_a_roberta_checkpoint_with_the_bert_continuation_config(tmp_path):
    """`--config continue_from_hf` asks for NSP; from RoBERTa the run says it trains MLM only and finishes."""
    ckpt, _ = _checkpoint(tmp_path, "roberta")
    args = [a for a in _overrides(tmp_path, ckpt, steps=2) if not a.startswith("--data.nsp")]
    proc = subprocess.run([sys.executable, "-m", "flaxbert.pretrain", "--config", "continue_from_hf", *args,
                           "--model.dtype=float32", "--run.global_batch_size=8"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no next-sentence prediction head; continuing MLM pretraining only" in proc.stderr + proc.stdout
    assert "finished at step 2" in proc.stdout
    _, info = transformers.RobertaForMaskedLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_a_checkpoint_without_a_tokenizer_is_refused_before_anything_is_prepared(tmp_path):
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(transformers.RobertaConfig(vocab_size=200, type_vocab_size=1, **SMALL)) \
        .save_pretrained(tmp_path / "bare")
    with pytest.raises(ConfigError, match=r"bare holds no tokenizer .*data.vocab="):
        pretraining.build_task(rc.load("", _overrides(tmp_path, tmp_path / "bare")))
    assert not (tmp_path / "run").exists()
