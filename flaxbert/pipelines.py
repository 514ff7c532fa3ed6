"""Prediction with a fine-tuned model directory: text classification, NER and extractive QA.

    clf = flaxbert.pipeline("text-classification", "runs/sst2/best_model")
    clf(["a gripping film", "dull"])   # [{"label": "1", "score": 0.97}, ...]
    ner = flaxbert.pipeline("ner", "runs/conll/best_model")
    ner("EU rejects German call")     # [{"entity": "ORG", "word": "EU", "start": 0, "end": 2, "score": ...}, ...]
    qa = flaxbert.pipeline("question-answering", "runs/squad/best_model")
    qa(question="Who?", context="...")  # {"answer": ..., "score": ..., "start": ..., "end": ...}

CLI: `python -m flaxbert.pipelines TASK MODEL_DIR TEXT...` (QA: `--question Q --context C`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence, Union

import numpy as np

from flaxbert import crf, crf_io, hf, scores
from flaxbert.heads import crf_params
from flaxbert.errors import ConfigError
from flaxbert.infer import batching
from flaxbert.infer import features as F
from flaxbert.infer.examples import QAExample, TextExample
from flaxbert.infer.predict import make_forward, run_model

TASKS = {"text-classification": "sequence_classification", "sentiment-analysis": "sequence_classification",
         "ner": "token_classification", "token-classification": "token_classification",
         "question-answering": "question_answering"}


def _label_names(model: hf.PretrainedModel) -> list[str]:
    id2label = model.hf_extra.get("id2label") or {}
    n = model.num_labels
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


class _Pipeline:
    def __init__(self, model: hf.PretrainedModel, max_length: int, batch_size: int):
        model.check_tokenizer("the model")
        self.model, self.batch_size = model, batch_size
        self.max_length = min(max_length, model.config.max_sequence_length)
        self.boundaries = batching.bucket_boundaries(self.max_length)
        self.forward = make_forward(model.config, model.head)
        self.labels = _label_names(model)

    def _run(self, feats: list[dict], seq_outputs: bool) -> list[tuple]:
        return run_model(self.forward, self.model.params, feats, self.batch_size, self.boundaries, seq_outputs).rows


class TextClassificationPipeline(_Pipeline):
    def __call__(self, texts: Union[str, Sequence[str], Sequence[tuple[str, str]]], top_k: int = 1):
        """Labels with softmax scores (top_k of them, best first); a regression head gives {"score"}."""
        single = isinstance(texts, str) or (isinstance(texts, tuple) and len(texts) == 2 and isinstance(texts[0], str))
        items = [texts] if single else list(texts)
        examples = [TextExample(t, None, None, f"input {i}") if isinstance(t, str)
                    else TextExample(t[0], t[1], None, f"input {i}") for i, t in enumerate(items)]
        feats = F.text_features(self.model.tokenizer, examples, self.max_length, with_labels=False)
        out = []
        for (logits,) in self._run(feats, seq_outputs=False):
            if len(logits) == 1:  # regression
                out.append({"score": float(logits[0])})
                continue
            probs = scores.softmax(logits)
            order = np.argsort(-probs)[:top_k]
            ranked = [{"label": self.labels[i], "score": float(probs[i])} for i in order]
            out.append(ranked[0] if top_k == 1 else ranked)
        return out[0] if single else out


class NERPipeline(_Pipeline):
    def __init__(self, model, max_length: int, batch_size: int, crf_constraints: bool = True):
        super().__init__(model, max_length, batch_size)
        self.crf = None  # a CRF model's decoding scores (heads' token_classification_crf)
        if model.head == crf_io.HEAD:
            self.crf = crf_params(model.params[model.head])
            self.crf = crf.bio_constrained(self.crf, self.labels) if crf_constraints else self.crf

    def _token_tags(self, logits: np.ndarray, word_ids: np.ndarray) -> np.ndarray:
        """The label id at every token: the argmax, or a CRF model's Viterbi path over the words' first tokens."""
        if self.crf is None:
            return logits.argmax(-1)
        return crf.decode([logits], [F.word_starts(word_ids)], self.crf)[0]

    def __call__(self, texts: Union[str, Sequence[str]]):
        """Entities as character spans of the input: {"entity", "word", "start", "end", "score"}.
        Words are the tokenizer's pre-tokens; a word's tag is its first sub-token's, and B-/I- tags are
        grouped into entities as seqeval/conlleval read them."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        tok = self.model.tokenizer
        results = []
        for text in items:
            enc = tok(text, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
            word_ids = np.asarray([-1 if w is None else w for w in enc.word_ids()], np.int32)
            n_words = int(word_ids.max()) + 1 if (word_ids >= 0).any() else 0
            feat = F.encoded_arrays(enc)
            (logits,) = self._run([feat], seq_outputs=True)[0]
            probs = scores.softmax(logits)
            # character span and first sub-token of every word
            spans, first = [[None, None] for _ in range(n_words)], [None] * n_words
            for pos, w in enumerate(word_ids):
                if w < 0:
                    continue
                s, e = enc["offset_mapping"][pos]
                if first[w] is None:
                    first[w], spans[w][0] = pos, s
                spans[w][1] = e
            best = self._token_tags(logits, word_ids)
            tags = [self.labels[int(best[first[w]])] for w in range(n_words)]
            entities = []
            for type_, a, b in scores.get_entities(tags):
                start, end = spans[a][0], spans[b][1]
                score = float(np.mean([probs[first[w], best[first[w]]] for w in range(a, b + 1)]))
                entities.append({"entity": type_, "word": text[start:end], "start": int(start), "end": int(end),
                                 "score": score})
            results.append(entities)
        return results[0] if single else results


class QuestionAnsweringPipeline(_Pipeline):
    def __init__(self, model, max_length: int, batch_size: int, settings: Optional[F.QASettings] = None):
        super().__init__(model, max_length, batch_size)
        base = settings or F.QASettings()
        self.settings = F.QASettings(self.max_length, min(base.doc_stride, self.max_length // 2),
                                     base.max_query_length, base.n_best_size, base.max_answer_length)

    def __call__(self, question: Union[str, Sequence[str]], context: Union[str, Sequence[str]], top_k: int = 1,
                 handle_impossible_answer: bool = False, null_threshold: float = 0.0, align_to_words: bool = True):
        """{"answer", "score", "start", "end"} (a list of `top_k` of them when top_k > 1): the best spans of
        `context` (character offsets), chosen and scored as transformers' pipeline does, widened to whole words
        (`align_to_words=False`: the spans of their tokens); see `features.qa_pipeline_answers`."""
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        single = isinstance(question, str)
        qs, cs = ([question], [context]) if single else (list(question), list(context))
        examples = [QAExample(str(i), "", c, q, [], False, f"input {i}") for i, (q, c) in enumerate(zip(qs, cs))]
        feats = F.qa_features(self.model.tokenizer, examples, self.settings, training=False, word_spans=align_to_words)
        rows = self._run(feats, seq_outputs=True)
        answers = F.qa_pipeline_answers(examples, feats, [r[0] for r in rows], [r[1] for r in rows],
                                        self.settings.max_answer_length, top_k, handle_impossible_answer,
                                        null_threshold, align_to_words)
        out = [a[0] if top_k == 1 else a for a in answers]
        return out[0] if single else out


def pipeline(task: str, model_dir: str, *, max_length: int = 384, batch_size: int = 32):
    """A callable predictor for `task` ("text-classification", "ner", "question-answering")."""
    if task not in TASKS:
        raise ConfigError(f"unknown pipeline task {task!r}; choose one of {sorted(TASKS)}")
    extra = {}
    if TASKS[task] == "token_classification" and crf_io.present(model_dir):  # a CRF model decodes with Viterbi
        model = crf_io.load_pretrained(model_dir, None, on_head_mismatch="error")
        extra["crf_constraints"] = crf_io.constrained(model_dir)
    else:
        model = hf.load_pretrained(model_dir, head=TASKS[task], num_labels=None, on_head_mismatch="error")
    model.check_tokenizer(model_dir)
    if model.report is not None and model.report.initialized:
        raise hf.HFLoadError(f"{model_dir}: has no trained {TASKS[task]} head "
                         f"(missing: {', '.join(model.report.initialized[:4])}); fine-tune it first")
    cls = {"sequence_classification": TextClassificationPipeline, "token_classification": NERPipeline,
           "question_answering": QuestionAnsweringPipeline}[TASKS[task]]
    return cls(model, max_length, batch_size, **extra)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flaxbert.pipelines", description="Predict with a fine-tuned model.")
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("model_dir")
    p.add_argument("texts", nargs="*", help="inputs (text-classification / ner); '-' reads lines from stdin")
    p.add_argument("--question", action="append", default=[])
    p.add_argument("--context", action="append", default=[])
    p.add_argument("--top-k", type=int, default=1)
    args = p.parse_args(argv)
    from flaxbert import cli

    def predict() -> int:
        pipe = pipeline(args.task, args.model_dir)
        if TASKS[args.task] == "question_answering":
            if not args.question or len(args.question) != len(args.context):
                raise ConfigError("give as many --question as --context")
            results = pipe(args.question, args.context)
        else:
            texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
            if not texts:
                raise ConfigError("no input texts (give them as arguments, or '-' to read lines from stdin)")
            results = pipe(texts, top_k=args.top_k) if isinstance(pipe, TextClassificationPipeline) else pipe(texts)
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
        return 0

    return cli.run("flaxbert.pipelines", predict)


if __name__ == "__main__":
    from flaxbert.cli import program_environment

    program_environment()  # before anything imports transformers
    sys.exit(main())
