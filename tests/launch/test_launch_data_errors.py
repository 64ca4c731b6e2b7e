"""Bad data is refused before anything starts: exit status 2, one line naming the config key,
the file, and for a bad row its number and field; no model is built, no run directory written."""

from __future__ import annotations

import json

import pytest

from launch.cli.main import main

GOOD_ROW = {"prompt": "1+1=", "answer": "2"}


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def train(tmp_path, capsys, *overrides: str) -> tuple[int, list[str]]:
    out = tmp_path / "runs"
    models = tmp_path / "models"
    code = main(["train", f"trainer.output_dir={out}", "trainer.run_name=r",
                 f"model.cache_dir={models}", *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    assert not out.exists(), "a run directory was written before the data was refused"
    assert not models.exists(), "a model was built before the data was refused"
    return code, lines


def test_missing_file(tmp_path, capsys):
    code, lines = train(tmp_path, capsys, f"data.train_path={tmp_path / 'nope.jsonl'}")
    assert code == 2 and len(lines) == 1
    assert lines[0] == f"lpreg: error: data.train_path: {tmp_path / 'nope.jsonl'}: no such data file"


def test_a_directory_is_not_a_data_file(tmp_path, capsys):
    (tmp_path / "dir.jsonl").mkdir()
    code, lines = train(tmp_path, capsys, f"data.train_path={tmp_path / 'dir.jsonl'}")
    assert code == 2 and "data.train_path" in lines[0] and "no such data file" in lines[0]


def test_unreadable_parquet(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    code, lines = train(tmp_path, capsys, f"data.train_path={bad}")
    assert code == 2 and len(lines) == 1 and "cannot read as Parquet" in lines[0]


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "1+1=", "answer": ', "row 3: not valid JSON"),
    ({"prompt": "1+1="}, "row 3: missing field 'answer'"),
    ({"answer": "2"}, "row 3: missing field 'prompt'"),
    ({"prompt": "1+1=", "answer": [2]}, "row 3: field 'answer' must be a string or a number"),
    ({"prompt": [{"role": "user"}], "answer": "2"}, "row 3: field 'prompt[0]' must be an object"),
    (["not", "an", "object"], "row 3: expected an object"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, capsys, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW, GOOD_ROW, row, GOOD_ROW])
    code, lines = train(tmp_path, capsys, f"data.train_path={path}")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"lpreg: error: data.train_path: {path}, {message}"), lines


def test_bad_eval_file_names_its_own_key(tmp_path, capsys):
    train_file = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "x"}])
    code, lines = train(tmp_path, capsys, f"data.train_path={train_file}",
                        f"data.eval_path={eval_file}")
    assert code == 2
    assert lines == [f"lpreg: error: data.eval_path: {eval_file}, row 1: missing field 'answer'"]


def test_empty_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    code, lines = train(tmp_path, capsys, f"data.train_path={path}")
    assert code == 2 and lines == [f"lpreg: error: data.train_path: {path}: contains no rows"]
