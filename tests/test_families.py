"""Model families (flaxbert.families): the registered table, HF config mapping, unsupported model types."""

import json

import pytest

from flaxbert import BertConfig, families
from flaxbert.errors import ConfigError, HFLoadError
from flaxbert.hf import load_pretrained


def test_bert_family_config_mapping_is_unchanged():
    cfg = BertConfig.tiny(vocab_size=99, type_vocab_size=3)
    hf = cfg.to_hf_config()
    assert hf["model_type"] == "bert" and hf["architectures"] == ["BertModel"]
    assert {k: hf[k] for k in families.BERT_HF_FIELDS} == {k: getattr(cfg, k) for k in families.BERT_HF_FIELDS}
    assert BertConfig.from_hf_config(hf) == cfg
    assert families.family_for("bert") is families.BERT


def test_family_renames_config_keys_both_ways():
    fam = families.Family(model_type="toy", config_names={"dim": "hidden_size", "n_layers": "num_hidden_layers"})
    fields = fam.fields_from_hf({"dim": 64, "n_layers": 3, "vocab_size": 50, "unrelated": 1, "pad_token_id": None})
    assert fields == {"hidden_size": 64, "num_hidden_layers": 3, "vocab_size": 50}
    back = fam.fields_to_hf(BertConfig.tiny().to_dict())
    assert back["dim"] == 128 and back["n_layers"] == 2 and "hidden_size" not in back
    with pytest.raises(TypeError):
        fam.config_names["x"] = "y"  # the table is read-only


@pytest.mark.parametrize("model_type", ["albert", "deberta-v2", "gpt2"])
def test_unsupported_model_type_names_it_and_lists_supported(model_type):
    with pytest.raises(ConfigError) as e:
        BertConfig.from_hf_config({"model_type": model_type})
    msg = str(e.value)
    assert f"model_type is {model_type!r}" in msg
    assert "supported model types: " + ", ".join(sorted(families.FAMILIES)) in msg


def test_unsupported_model_type_in_a_directory_is_an_hf_load_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "albert", "vocab_size": 100}))
    with pytest.raises(HFLoadError, match=r"model_type is 'albert'.*supported model types: bert"):
        load_pretrained(str(tmp_path))
