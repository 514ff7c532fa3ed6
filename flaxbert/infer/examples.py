"""The example records that readers produce and featurizers consume (fine-tuning and prediction alike); each
remembers where it came from (`file:line`, or "input i" for prediction)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

Label = Union[str, float, None]


@dataclasses.dataclass
class TextExample:
    """A single sentence or a sentence pair with a class name (str), a score (float) or no label."""
    text: str
    text_pair: Optional[str]
    label: Label
    where: str  # "file:line" for error messages and prediction files


@dataclasses.dataclass
class TokenExample:
    """A pre-tokenised sentence with one tag per word (CoNLL)."""
    words: list[str]
    tags: Optional[list[str]]
    where: str


@dataclasses.dataclass
class QAExample:
    """One SQuAD question. `answers` holds (text, char_start) pairs; none for unanswerable v2 questions."""
    qid: str
    title: str
    context: str
    question: str
    answers: list[tuple[str, int]]
    is_impossible: bool
    where: str


@dataclasses.dataclass
class ChoiceExample:
    """A SWAG-style multiple-choice question: a context, the start of the continuation, the endings."""
    context: str
    start: str
    endings: list[str]
    label: Optional[int]
    where: str
