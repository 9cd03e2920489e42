"""File tasks (`configs/files.py`): each kind trains end to end from its own file format; every
malformed input stops `sparseformer train` with one line naming file and line, writing nothing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from sparseformer.data import files, get_task
from sparseformer.train import cli

ROOT = Path(__file__).parents[2]
FAST = ["--config.num_train_steps=2", "--config.num_eval_batches=1", "--config.model.num_layers=1",
        "--config.log_every_steps=1"]


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for i, line in (raw_lines or {}).items():
        lines[i] = line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def classify_records(n: int, seed: int = 0, labels=("pos", "neg")) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": f"{labels[i % len(labels)]} " + "ab " * int(rng.integers(1, 20)), "label": labels[i % len(labels)]}
            for i in range(n)]


def train(tmp_path: Path, capsys, kind: str, *args: str, attention: str = "rsa") -> tuple[int, str, Path]:
    work = tmp_path / "run"
    code = cli.train_main([f"--config={ROOT}/configs/files.py:kind={kind},attention={attention},scale=tiny",
                           f"--workdir={work}", *FAST, *args])
    return code, capsys.readouterr().err, work


@pytest.mark.slow
def test_classify_jsonl_holdout_labels_saved_and_eval_reads_them(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", classify_records(60, labels=("10", "2", "neg")))
    code, err, work = train(tmp_path, capsys, "classify", f"--config.data.train_file={data}")
    assert code == 0, err[-2000:]
    config = json.loads((work / "config.json").read_text())
    assert config["data"]["labels"] == ["2", "10", "neg"]  # natural order: integers by value, then strings
    assert config["model"]["num_classes"] == 3 and config["data"]["artifacts_dir"] == str(work / "data")
    assert list((work / "data").glob("train.jsonl.*.index.npz"))
    assert cli.eval_main([f"--workdir={work}", "--split=validation"]) == 0
    # the run's label map is fixed: a record with a new label is refused, never silently re-mapped
    write_jsonl(data, classify_records(60, labels=("10", "2", "neg")) + [{"text": "x", "label": "0"}])
    assert cli.eval_main([f"--workdir={work}", "--split=validation"]) == 1
    assert f"{data}:61: label '0' is" in capsys.readouterr().err


@pytest.mark.slow
def test_translate_tsv_with_a_sentencepiece_tokenizer(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    rows = ["src\ttgt"] + [f"{w} {w}s and {w}\t{w[::-1]} ok" for w in ("cat", "dog", "bird", "fish") * 15]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    code, err, work = train(tmp_path, capsys, "translate", f"--config.data.train_file={tmp_path / 'pairs.tsv'}",
                            f"--config.data.eval_file={tmp_path / 'dev.tsv'}", "--config.data.source_field=src",
                            "--config.data.target_field=tgt", "--config.data.tokenizer=spm",
                            "--config.data.tokenizer_vocab_size=40", "--config.data.max_len=64",
                            "--config.data.max_target_len=64")
    assert code == 0, err[-2000:]
    config = json.loads((work / "config.json").read_text())
    assert (work / "data" / "tokenizer.model").exists()
    assert config["model"]["vocab_size"] == config["data"]["tokenizer_vocab_size"] <= 40
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["task"] == "files_translate" and "bleu" in metrics


@pytest.mark.slow
def test_lm_csv_with_quoted_commas(tmp_path, capsys):
    lines = ["id,body"] + [f'{i},"hello, world {i}, ""quoted"" {"ab" * (i % 7)}"' for i in range(40)]
    (tmp_path / "lm.csv").write_text("\n".join(lines) + "\n")
    code, err, work = train(tmp_path, capsys, "lm", f"--config.data.train_file={tmp_path / 'lm.csv'}",
                            "--config.data.text_field=body", attention="dense")
    assert code == 0, err[-2000:]
    assert json.loads((work / "metrics.json").read_text())["perplexity"] > 1


GOOD = classify_records(20)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "{train}: no such file"),
        ("empty", "{train}: no records (the file is empty)"),
        ("bad_json", "{train}:4: not valid JSON"),
        ("not_object", "{train}:2: expected a JSON object, got list"),
        ("unknown_field", "{train}:1: no field 'body' (config.data.text_field); fields: text, label"),
        ("text_type", "{train}:3: field 'text' must be a string, got int"),
        ("eval_only_label", "{eval}:2: label 'maybe' is only in evaluation data"),
        ("not_utf8", "{train}:5: not UTF-8 text"),
        ("csv_columns", "{csv}:3: 3 columns, but the header has 2 (text, label)"),
        ("csv_quote", "{csv}:2: a quoted field does not end on its line"),
        ("csv_header", "{csv}:1: the header has no column 'label' (config.data.label_field)"),
        ("one_label", "{train}: field 'label' has 1 distinct label(s)"),
    ],
)
def test_malformed_input_is_one_line_naming_file_and_line_and_writes_nothing(tmp_path, capsys, case, message):
    train_file, eval_file, csv_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "data.csv"
    args = [f"--config.data.train_file={train_file}"]
    if case == "empty":
        train_file.write_text("")
    elif case == "bad_json":
        write_jsonl(train_file, GOOD, {3: '{"text": "x", "label": "pos",}'})
    elif case == "not_object":
        write_jsonl(train_file, GOOD, {1: '["pos", "text"]'})
    elif case == "unknown_field":
        write_jsonl(train_file, GOOD)
        args.append("--config.data.text_field=body")
    elif case == "text_type":
        write_jsonl(train_file, GOOD, {2: '{"text": 7, "label": "pos"}'})
    elif case == "eval_only_label":
        write_jsonl(train_file, GOOD)
        write_jsonl(eval_file, [{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}])
        args.append(f"--config.data.eval_file={eval_file}")
    elif case == "not_utf8":
        write_jsonl(train_file, GOOD)
        raw = train_file.read_bytes().split(b"\n")
        raw[4] = b'{"text": "caf\xe9", "label": "pos"}'
        train_file.write_bytes(b"\n".join(raw))
    elif case.startswith("csv"):
        body = {"csv_columns": 'text,label\n"a, b",pos\nc,neg,extra\n',
                "csv_quote": 'text,label\n"a, b\n', "csv_header": "text,tag\na,pos\n"}[case]
        csv_file.write_text(body)
        args = [f"--config.data.train_file={csv_file}"]
    elif case == "one_label":
        write_jsonl(train_file, [{"text": "a", "label": "pos"}] * 10)
    work = tmp_path / "run"
    code = cli.train_main([f"--config={ROOT}/configs/files.py:kind=classify,scale=tiny", f"--workdir={work}", *args])
    err = capsys.readouterr().err
    expected = message.format(train=train_file, eval=eval_file, csv=csv_file)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not work.exists()  # nothing written: no run directory, no index cache, no config.json


def test_missing_train_file_key_names_it(tmp_path, capsys):
    code = cli.train_main([f"--config={ROOT}/configs/files.py:kind=lm,scale=tiny", f"--workdir={tmp_path / 'r'}"])
    assert code == 2 and "config.data.train_file: required" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_records_are_read_by_offset_and_the_source_pickles(tmp_path):
    records = [{"text": "é" * (i % 5) + f" {i}", "label": "ab"[i % 2]} for i in range(50)]
    path = write_jsonl(tmp_path / "t.jsonl", records, {7: "   "})  # a blank line is skipped, lines keep counting
    index = files.build_index(path, "jsonl", {"text": "text_field"}, "label")
    assert len(index) == 49 and index.lines[7] == 9 and index.labels == ["a", "b"]
    source = pickle.loads(pickle.dumps(files.FileSource(index)))
    assert source[7]["text"] == records[8]["text"] and source[7]["_line"] == 9
    assert [source[i]["label"] for i in range(49)] == [index.labels[c] for c in index.label_codes]
    train, val, test = files.holdout_split(49, 0.1, seed=3, parts=2)
    assert (len(train), len(val), len(test)) == (39, 5, 5)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(49))
    again = files.holdout_split(49, 0.1, seed=3, parts=2)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))


def test_files_tasks_are_registered_with_their_kinds():
    assert {get_task(f"files_{k}").kind for k in ("classify", "translate", "lm")} == {"classifier", "seq2seq", "lm"}
