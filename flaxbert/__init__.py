"""flaxbert: fast BERT pretraining and fine-tuning in JAX/Flax, interoperable with Hugging Face."""

from flaxbert.config import BertConfig, ConfigError
from flaxbert.heads import (HEADS, MaskedLMOutput, MultipleChoiceOutput, PretrainingOutput,
                            QuestionAnsweringOutput, SequenceClassifierOutput, TokenClassifierOutput,
                            apply_head, init, logical_axes, param_shapes)
from flaxbert.hf import HFLoadError, LoadReport, PretrainedModel, load_pretrained, save_pretrained
from flaxbert.model import EncoderOutput, InputError, encode

__all__ = [
    "BertConfig", "ConfigError", "EncoderOutput", "InputError", "HEADS", "init", "encode", "apply_head",
    "logical_axes", "param_shapes", "PretrainingOutput", "MaskedLMOutput", "SequenceClassifierOutput",
    "TokenClassifierOutput", "QuestionAnsweringOutput", "MultipleChoiceOutput", "load_pretrained",
    "save_pretrained", "PretrainedModel", "LoadReport", "HFLoadError", "pipeline",
]


def pipeline(task: str, model_dir: str, **kwargs):
    """Prediction with a fine-tuned model: "text-classification", "ner" or "question-answering".
    See `flaxbert.pipelines` (imported lazily, so `python -m flaxbert.pipelines` runs cleanly)."""
    from flaxbert.pipelines import pipeline as make

    return make(task, model_dir, **kwargs)
