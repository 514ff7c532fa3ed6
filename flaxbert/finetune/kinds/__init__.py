"""Task kinds, one object per kind in its own module, registered here. A new kind is a new module with a
`Kind` subclass and one line in `KINDS`; nothing else in fine-tuning tests the kind's name."""

from __future__ import annotations

from flaxbert.errors import ConfigError
from flaxbert.finetune.kinds.base import EvalResult, EvalSettings, Kind
from flaxbert.finetune.kinds.classification import CLASSIFICATION
from flaxbert.finetune.kinds.multiple_choice import MULTIPLE_CHOICE
from flaxbert.finetune.kinds.ner import NER_KIND
from flaxbert.finetune.kinds.ner_crf import NER_CRF, NER_CRF_UNCONSTRAINED
from flaxbert.finetune.kinds.qa import QA_KIND
from flaxbert.finetune.kinds.regression import REGRESSION

KINDS: dict[str, Kind] = {k.name: k for k in (CLASSIFICATION, REGRESSION, NER_KIND, QA_KIND, MULTIPLE_CHOICE,
                                               NER_CRF, NER_CRF_UNCONSTRAINED)}


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise ConfigError(f"unknown task kind {name!r}; choose one of {sorted(KINDS)}")
    return KINDS[name]


__all__ = ["KINDS", "Kind", "EvalResult", "EvalSettings", "get_kind"]
