"""Readers on the data as distributed (../shared/data) and the errors for bad input (file and line)."""

import csv
import json
from pathlib import Path

import pytest

from flaxbert.finetune import readers
from flaxbert.finetune.task_data import Columns, load_task_data, locate_files
from flaxbert.finetune.readers import DataError
from flaxbert.finetune.tasks import GLUE_TASKS, get_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(),
                                reason="../shared/data (GLUE, CoNLL, SQuAD, emotion) is not beside the checkout")


@needs_data
@pytest.mark.parametrize("task, split, rows, counts", [
    # counts as published for the distributed files (see ../shared/data/README.md)
    ("sst2", "dev", 872, {"1": 444, "0": 428}),
    ("mrpc", "dev", 408, {"1": 279, "0": 129}),
    ("rte", "dev", 277, {"entailment": 146, "not_entailment": 131}),
    ("cola", "dev", 1043, {"1": 721, "0": 322}),
])
def test_glue_dev_files_as_distributed(task, split, rows, counts):
    td = load_task_data(get_task(task), str(DATA / "glue"), with_train=False)
    examples = td.evals[split]
    assert len(examples) == rows
    assert {k: sum(ex.label == k for ex in examples) for k in counts} == counts
    assert all(ex.text for ex in examples)
    if task in ("mrpc", "rte"):
        assert all(ex.text_pair for ex in examples)


@needs_data
def test_glue_quirks():
    # MRPC: the BOM is not part of the first column name and the untokenised text keeps its quotes
    mrpc = load_task_data(get_task("mrpc"), str(DATA / "glue" / "MRPC"), with_train=False).evals["dev"]
    assert not mrpc[0].text.startswith("\ufeff")
    # CoLA has no header: the first line is an example, and the last line (no trailing newline) is read
    cola = readers.read_delimited(DATA / "glue/CoLA/dev.tsv", 3, None, 1, header=False)
    first = (DATA / "glue/CoLA/dev.tsv").read_text(encoding="utf-8").split("\n")[0].split("\t")
    assert cola[0].text == first[3].strip() and cola[0].label == first[1]
    assert cola[0].where.endswith("dev.tsv:1")
    # STS-B scores are floats in [0, 5]; RTE's bare quotes do not swallow lines (QUOTE_NONE)
    stsb = load_task_data(get_task("stsb"), str(DATA / "glue"), with_train=False).evals["dev"]
    assert len(stsb) == 1500 and all(isinstance(ex.label, float) and 0 <= ex.label <= 5 for ex in stsb)
    assert any('"' in ex.text + ex.text_pair for ex in stsb)


def test_every_glue_task_is_registered_with_its_official_metric():
    expected = {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1", "stsb": "pearson",
                "mnli": "matched_accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy"}
    assert set(GLUE_TASKS) == set(expected)
    for name, metric in expected.items():
        assert get_task(name).main_metric == metric
    assert get_task("SST-2") is get_task("sst2")


def _write_glue(tmp_path, name, header, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "train.tsv").write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
    (d / "dev.tsv").write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
    return d


def test_mnli_and_qqp_layouts(tmp_path):
    d = tmp_path / "MNLI"
    d.mkdir()
    header = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2",
              "label1", "gold_label"]
    row = ["0", "1", "1e", "gov", "x", "x", "x", "x", "A man sleeps.", "A person rests.", "entailment",
           "entailment"]
    for f in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (d / f).write_text("\t".join(header) + "\n" + "\t".join(row) + "\n")
    td = load_task_data(get_task("mnli"), str(tmp_path))
    assert sorted(td.evals) == ["matched", "mismatched"]
    assert td.evals["matched"][0].label == "entailment" and td.evals["matched"][0].text_pair == "A person rests."
    qqp = _write_glue(tmp_path, "QQP", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                      [["0", "1", "2", "How?", "Why?", "0"]])
    with open(qqp / "train.tsv", "a") as f:
        f.write("1\t3\t4\tbroken row without a label\n")
    td = load_task_data(get_task("qqp"), str(qqp))
    assert (td.train[0].text, td.train[0].text_pair, td.train[0].label) == ("How?", "Why?", "0")
    assert len(td.train) == 1  # the malformed row is skipped for QQP only, with a notice naming its line


# ----- bad input ---------------------------------------------------------------------------------

def test_label_outside_label_set_names_file_and_line(tmp_path):
    from flaxbert.finetune.task_data import FeatureSettings, make_features

    d = _write_glue(tmp_path, "SST-2", ["sentence", "label"], [["good", "1"], ["bad", "0"], ["meh", "2"]])
    td = load_task_data(get_task("sst2"), str(d))

    class Tok:  # the label check runs before any model is needed; any tokenizer will do
        def __call__(self, texts, pairs=None, **kw):
            return {"input_ids": [[1, 2]] * len(texts), "token_type_ids": [[0, 0]] * len(texts)}

    with pytest.raises(DataError, match=r"SST-2/train\.tsv:4: label '2' is not in the label set"):
        make_features(td.task, Tok(), td.train, FeatureSettings(), training=True)


def test_missing_column_empty_file_and_ragged_rows(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("sentence,label\nhello,pos\n")
    with pytest.raises(DataError, match=r"train\.csv:1: missing column 'text'"):
        readers.read_text_file(f)
    empty = tmp_path / "dev.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"dev\.tsv: file is empty"):
        readers.read_text_file(empty)
    ragged = tmp_path / "train.tsv"
    ragged.write_text("text\tlabel\na\tx\nb\ty\textra\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: expected 2 fields like line 1, found 3"):
        readers.read_text_file(ragged)
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing column 'text'"):
        readers.read_text_file(j)
    conll = tmp_path / "c.txt"
    conll.write_text("EU NNP B-ORG\nrejects VBZ O\nGerman JJ\n")
    with pytest.raises(DataError, match=r"c\.txt:3: expected 3 columns"):
        readers.read_conll(conll)
    semi = tmp_path / "e.txt"
    semi.write_text("i feel good;joy\nno label here\n")
    with pytest.raises(DataError, match=r"e\.txt:2: expected 'text;label'"):
        readers.read_semicolon_lines(semi)


def test_squad_answer_must_sit_at_its_offset(tmp_path):
    bad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "France", "answer_start": 3}]}]}]}]}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"s\.json: question q1 .*'France' is not at answer_start 3"):
        readers.read_squad(f)


# ----- other formats -----------------------------------------------------------------------------

@needs_data
def test_conll_squad_and_emotion_counts():
    train = readers.read_conll(DATA / "conll2003/train.txt")
    assert len(train) == 14041 and sum(len(s.words) for s in train) == 203621
    assert all(len(s.words) == len(s.tags) for s in train)
    squad = readers.read_squad(DATA / "squad/dev-v1.1.json")
    assert len(squad) == 10570 and len({ex.title for ex in squad}) == 48
    td = load_task_data(get_task("emotion"), str(DATA / "emotion"))
    assert len(td.train) == 16000 and list(td.evals) == ["test"] and len(td.evals["test"]) == 2000
    assert td.task.labels == ("anger", "fear", "joy", "love", "sadness", "surprise")


def test_custom_csv_jsonl_and_label_names_from_data(tmp_path):
    (tmp_path / "train.csv").write_text('text,text_pair,label\n"a, quoted",b,yes\nc,d,no\n')
    (tmp_path / "dev.jsonl").write_text('{"text": "e", "text_pair": "f", "label": "no"}\n')
    td = load_task_data(get_task("text_pair_classification"), str(tmp_path),
                        columns=Columns(text_pair="text_pair"))
    assert td.task.labels == ("no", "yes")
    assert td.train[0].text == "a, quoted" and td.evals["dev"][0].text_pair == "f"
    spec = f"train={tmp_path / 'train.csv'},dev={tmp_path / 'dev.jsonl'}"
    train, evals = locate_files(get_task("text_classification"), spec)
    assert train.name == "train.csv" and evals[0][0] == "dev"


def test_labels_that_are_one_number_in_several_spellings_are_one_class(tmp_path):
    """JSONL 1, "1", 1.0 and true are the class "1"; CSV "1" and "1.0" too; other text stays as written."""
    rows = [1, "1", 1.0, True, 0, "0.0", False, 2.5, "cat"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n"
                                                  for i, v in enumerate(rows)))
    (tmp_path / "dev.csv").write_text("text,label\na,1\nb,1.0\nc, 0 \nd,2.50\ne,cat\n")
    td = load_task_data(get_task("text_classification"), str(tmp_path))
    assert [ex.label for ex in td.train] == ["1", "1", "1", "1", "0", "0", "0", "2.5", "cat"]
    assert [ex.label for ex in td.evals["dev"]] == ["1", "1", "0", "2.5", "cat"]
    assert td.task.labels == ("0", "1", "2.5", "cat")
    assert readers.class_name("nan") == "nan" and readers.class_name(" positive ") == "positive"


def test_swag_reader(tmp_path):
    f = tmp_path / "val.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
                    "ending0", "ending1", "ending2", "ending3", "label"])
        w.writerow(["v", "0", "x", "She opens the door.", "She", "gold", "walks in.", "flies.", "eats it.", "sings.",
                    "0"])
        w.writerow(["v", "1", "x", "He sits.", "He", "gold", "a", "b", "c", "d", "7"])
    with pytest.raises(DataError, match=r"val\.csv:3: label 7 is outside 0\.\.3"):
        readers.read_swag(f)


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0]}, features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["fine"], "label": [1]}, features=features)})
    ds.save_to_disk(str(tmp_path / "sst2"))
    td = load_task_data(get_task("sst2"), str(tmp_path / "sst2"))
    # GLUE SST-2's files say 0/1 where HF's ClassLabel says negative/positive: the class index is used
    assert [ex.label for ex in td.train] == ["1", "0"]
    assert td.task.labels == ("0", "1")
    custom = load_task_data(get_task("text_classification"), str(tmp_path / "sst2"), columns=Columns(text="sentence"))
    assert custom.task.labels == ("negative", "positive") and custom.evals["dev"][0].label == "positive"
