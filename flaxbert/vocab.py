"""Tokenizers: load a Hugging Face tokenizer directory, train a BERT WordPiece vocabulary, check round trips.

`python -m flaxbert.vocab --corpus CORPUS --vocab-size N --out DIR [--cased]` trains a vocabulary from any
corpus that `flaxbert.data` reads and writes vocab.txt + tokenizer.json + tokenizer_config.json, which
`transformers.AutoTokenizer`, `BertTokenizerFast` and `load_tokenizer` all load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from flaxbert.data.corpus import iter_texts
from flaxbert.errors import VocabError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's ids 0..4 in a trained vocab


def _vocab_is_uncased(vocab_file: Path) -> bool:
    """A vocab.txt where (almost) no token outside [SPECIAL] ones has a letter that lower-cases to another
    belongs to an uncased tokenizer (bert-base-uncased has 2 such tokens, 'ℝ'-like symbols aside; cased: 1000s)."""
    with open(vocab_file, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    cased = sum(1 for t in tokens if not (t.startswith("[") and t.endswith("]")) and t != t.lower())
    return cased <= 0.001 * len(tokens)


def load_tokenizer(path: str | os.PathLike):
    """A fast HF tokenizer from a directory holding tokenizer.json and/or vocab.txt.

    With tokenizer_config.json the directory is loaded as `AutoTokenizer` would; a bare vocab.txt becomes a
    `BertTokenizerFast` whose lower-casing is inferred from the vocabulary; a bare tokenizer.json keeps its own.
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise VocabError(f"{path}: tokenizer directory not found")
    has_json, has_vocab = (path / "tokenizer.json").is_file(), (path / "vocab.txt").is_file()
    if not (has_json or has_vocab):
        raise VocabError(f"{path}: no tokenizer.json or vocab.txt in this directory")
    try:
        if (path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
        elif has_json:  # BertTokenizerFast would reset a BertNormalizer to its own lower-casing default
            normalizer = json.loads((path / "tokenizer.json").read_text(encoding="utf-8")).get("normalizer") or {}
            kw = {k: normalizer[k] for k in ("lowercase", "strip_accents") if k in normalizer}
            tokenizer = BertTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                          do_lower_case=kw.get("lowercase", True),
                                          strip_accents=kw.get("strip_accents"))
        else:
            tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"),
                                          do_lower_case=_vocab_is_uncased(path / "vocab.txt"))
    except Exception as e:  # noqa: BLE001 - any loader failure is re-raised naming the directory
        raise VocabError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None
    if not tokenizer.is_fast:
        raise VocabError(f"{path}: only fast (tokenizers-backed) tokenizers are supported")
    tokenizer.backend_tokenizer.no_padding()  # transformers sets these per call; direct backend use must not pad
    tokenizer.backend_tokenizer.no_truncation()
    for name in ("cls_token", "sep_token", "mask_token", "pad_token"):
        token = getattr(tokenizer, name)
        if token is None or tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise VocabError(f"{path}: the tokenizer has no {name} in its vocabulary; BERT pretraining needs "
                             f"[CLS], [SEP], [MASK] and [PAD]")
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the serialised tokenizer (vocabulary, normaliser, pre-tokeniser): names a tokenizer exactly."""
    import hashlib

    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def _wordpiece_tokenizer(lowercase: bool, strip_accents: bool | None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok, processors


def train_wordpiece(files: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int,
                    out_dir: str | os.PathLike, lowercase: bool = True, *, strip_accents: bool | None = None,
                    min_frequency: int = 2, limit_alphabet: int = 1000, corpus_format: str | None = None,
                    text_column: str = "text", show_progress: bool = False):
    """Train a BERT WordPiece vocabulary on corpora (any spec `flaxbert.data` reads) and save it to `out_dir`.

    Writes vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json, with BERT's special
    tokens at ids 0..4 ([PAD] [UNK] [CLS] [SEP] [MASK]); returns the loaded `BertTokenizerFast`.
    `strip_accents=None` follows `lowercase`, as BERT does.
    """
    from tokenizers import trainers
    from transformers import BertTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise VocabError(f"vocab_size must be an integer above {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    specs = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    tok, processors = _wordpiece_tokenizer(lowercase, strip_accents)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), limit_alphabet=limit_alphabet,
                                        continuing_subword_prefix="##", show_progress=show_progress)
    seen = {"texts": 0}

    def texts():
        for spec in specs:
            for text in iter_texts(spec, corpus_format, text_column=text_column):
                seen["texts"] += bool(text.strip())
                yield text

    tok.train_from_iterator(texts(), trainer=trainer)
    if not seen["texts"] or tok.get_vocab_size() <= len(SPECIAL_TOKENS):  # checked before anything is written
        raise VocabError(f"{', '.join(map(str, specs))}: the corpus holds no text to train a vocabulary on "
                         f"({seen['texts']} non-empty texts read); nothing was written to {out_dir}")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase,
                                  strip_accents=strip_accents, tokenize_chinese_chars=True)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "vocab.txt").is_file():  # older transformers save only tokenizer.json
        tok.model.save(str(out_dir))
    return load_tokenizer(out_dir)


class RoundTrip(NamedTuple):
    """Word-level comparison of normalised text with decode(encode(text))."""

    words: int  # pre-tokenised words compared
    unk_words: int  # words the vocabulary maps to [UNK] (characters outside its alphabet)
    mismatches: list  # (line number, expected word, decoded word) for other differences, at most 20
    unk_examples: list  # up to 20 words that became [UNK]


def round_trip(tokenizer, lines: Iterable[str]) -> RoundTrip:
    """Encode and decode each line; every pre-tokenised word must come back, except those mapped to [UNK]."""
    from tokenizers import decoders

    backend = tokenizer.backend_tokenizer
    unk = tokenizer.unk_token
    decoder = backend.decoder
    if isinstance(decoder, decoders.WordPiece):  # its "cleanup" glues " ," to ","; compare words, not spacing
        decoder = decoders.WordPiece(prefix=decoder.prefix, cleanup=False)
    words = unk_words = 0
    mismatches, unk_examples = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        normalized = backend.normalizer.normalize_str(line) if backend.normalizer else line
        expected = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        decoded = decoder.decode(backend.encode(line, add_special_tokens=False).tokens).split()
        words += len(expected)
        if len(decoded) != len(expected):
            mismatches.append((number, " ".join(expected), " ".join(decoded)))
            continue
        for want, got in zip(expected, decoded):
            if got == unk and want != unk:
                unk_words += 1
                if len(unk_examples) < 20:
                    unk_examples.append(want)
            elif got != want and len(mismatches) < 20:
                mismatches.append((number, want, got))
    return RoundTrip(words, unk_words, mismatches[:20], unk_examples)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flaxbert.vocab", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, nargs="+", help="corpus files or specs (hf:..., tfds:...)")
    parser.add_argument("--format", default=None, help="corpus format (default: from the file name)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--limit-alphabet", type=int, default=1000)
    args = parser.parse_args(argv)
    from flaxbert import cli

    return cli.run("flaxbert.vocab", lambda: _train_and_report(args))  # the traceback: not into the vocab dir


def _train_and_report(args) -> int:
    tokenizer = train_wordpiece(args.corpus, args.vocab_size, args.out, lowercase=not args.cased,
                                min_frequency=args.min_frequency, limit_alphabet=args.limit_alphabet,
                                corpus_format=args.format, text_column=args.text_column, show_progress=True)
    report = round_trip(tokenizer, (t for spec in args.corpus
                                    for t in iter_texts(spec, args.format, text_column=args.text_column)))
    print(f"wrote {args.out}: {len(tokenizer)} tokens; round trip: {report.words} words, "
          f"{report.unk_words} mapped to [UNK], {len(report.mismatches)} other mismatches")
    if report.unk_examples:
        print("  [UNK] words, e.g.: " + " ".join(report.unk_examples[:10]))
    return 0


if __name__ == "__main__":
    from flaxbert.cli import program_environment

    program_environment()  # before anything imports transformers
    sys.exit(main())
