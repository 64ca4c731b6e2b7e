"""verl-layout data (DAPO-Math-17k, verl's benchmark files) read as it is, and other layouts
through data.prompt_key / data.answer_key."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.data.prompts import DataError, PromptRecord, load_prompts_file

DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
               "to the problem.\n\n{}\n\nRemember to put your answer on its own line after \"Answer:\".")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
REWARD_MODEL = pa.struct([("ground_truth", pa.string()), ("style", pa.string())])
EXTRA_INFO = pa.struct([("index", pa.string()), ("split", pa.string())])
VERL_SCHEMA = pa.schema([("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)),
                         ("ability", pa.string()), ("reward_model", REWARD_MODEL),
                         ("extra_info", EXTRA_INFO)])


def verl_row(question: str, answer: str | None, index: str, source: str = "math_dapo") -> dict:
    return {"data_source": source,
            "prompt": [{"role": "user", "content": DAPO_PROMPT.format(question)}],
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lean"},
            "extra_info": {"index": index, "split": "train"}}


def write_verl(path, rows: list[dict], row_group_size: int | None = None):
    pq.write_table(pa.Table.from_pylist(rows, schema=VERL_SCHEMA), path,
                   row_group_size=row_group_size)
    return path


def test_verl_parquet_loads_with_answers_from_the_reward_model(tmp_path):
    path = write_verl(tmp_path / "dapo-math-17k.parquet",
                      [verl_row("What is 1+1?", "2", "a1b2"), verl_row("What is 2*3?", "6", "c3d4")])
    records = load_prompts_file(path)
    assert [r.answer for r in records] == ["2", "6"]
    first = records[0]
    assert first.is_chat and first.messages() == [
        {"role": "user", "content": DAPO_PROMPT.format("What is 1+1?")}]
    assert first.data_source == "math_dapo"
    assert first.id == "dapo-math-17k-a1b2"  # extra_info.index names the record
    assert first.extra_info == {"index": "a1b2", "split": "train"}


def test_records_with_extra_info_stay_hashable_and_old_constructor_calls_work():
    with_info = PromptRecord(prompt="q", answer="1", data_source="s", id="i", extra_info={"index": 3})
    assert hash(with_info) == hash(PromptRecord("q", "1", "s", "i"))
    assert with_info == PromptRecord("q", "1", "s", "i", {"index": 3})
    assert with_info != PromptRecord("q", "1", "s", "i", {"index": 4})
    assert len({with_info, with_info}) == 1


def test_large_verl_files_are_read_batch_by_batch_in_order(tmp_path, monkeypatch):
    import launch.data.prompts as prompts

    monkeypatch.setattr(prompts, "PARQUET_BATCH_ROWS", 7)
    rows = [verl_row(f"q{i}", str(i), f"id{i}") for i in range(50)]
    records = load_prompts_file(write_verl(tmp_path / "big.parquet", rows, row_group_size=16))
    assert [r.answer for r in records] == [str(i) for i in range(50)]


def test_only_the_needed_columns_are_read(tmp_path, monkeypatch):
    read = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        read.append(kwargs.get("columns"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    load_prompts_file(write_verl(tmp_path / "d.parquet", [verl_row("q", "1", "0")]))
    # reward_model.style and ability are never read.
    assert sorted(read[0]) == ["data_source", "extra_info", "prompt", "reward_model.ground_truth"]


def test_verl_rows_in_jsonl_load_too(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(verl_row("q", "7", "9")) + "\n")
    record = load_prompts_file(path)[0]
    assert record.answer == "7" and record.id == "d-9"


def test_plain_answer_wins_over_the_reward_model(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "1",
                                "reward_model": {"ground_truth": "2"}}) + "\n")
    assert load_prompts_file(path)[0].answer == "1"


def test_custom_layout_through_prompt_and_answer_keys(tmp_path):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({
        "question": ["1+1=", "2+2="],
        "meta": pa.array([{"solution": {"final": "2"}, "level": 1},
                          {"solution": {"final": "4"}, "level": 3}]),
    }), path)
    records = load_prompts_file(path, prompt_key="question", answer_key="meta.solution.final")
    assert [(r.prompt, r.answer) for r in records] == [("1+1=", "2"), ("2+2=", "4")]
    assert records[0].id == "custom-1"

    jsonl = tmp_path / "custom.jsonl"
    jsonl.write_text(json.dumps({"problem": "3+3=", "label": {"value": 6}}) + "\n")
    assert load_prompts_file(jsonl, "problem", "label.value")[0].answer == "6"


def test_answer_key_can_point_at_the_reward_model_explicitly(tmp_path):
    path = write_verl(tmp_path / "d.parquet", [verl_row("q", "5", "0")])
    assert load_prompts_file(path, answer_key="reward_model.ground_truth")[0].answer == "5"


def test_missing_nested_answer_names_file_row_index_and_field(tmp_path):
    path = write_verl(tmp_path / "bad.parquet",
                      [verl_row("q", "1", "k0"), verl_row("q", None, "k1")])
    for answer_key in (None, "reward_model.ground_truth"):
        with pytest.raises(DataError, match=r"bad.parquet, row 2 \(index k1\): missing field "
                                            r"'reward_model.ground_truth'$") as err:
            load_prompts_file(path, answer_key=answer_key)
        assert str(path) in str(err.value)


def test_a_row_with_neither_answer_layout_names_the_plain_field(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "extra_info": [{"index": 4}]}), path)
    with pytest.raises(DataError, match=r"row 1 \(index 4\): missing field 'answer'$"):
        load_prompts_file(path)


def test_a_key_the_file_does_not_have_is_named(tmp_path):
    path = write_verl(tmp_path / "d.parquet", [verl_row("q", "1", "k0")])
    with pytest.raises(DataError, match=r"row 1 \(index k0\): missing field 'reward_model.answer'"):
        load_prompts_file(path, answer_key="reward_model.answer")
    with pytest.raises(DataError, match=r"row 1 \(index k0\): missing field 'question'"):
        load_prompts_file(path, prompt_key="question")
    with pytest.raises(DataError, match=r"row 1 \(index k0\): missing field 'x.y'"):
        load_prompts_file(path, prompt_key="x.y")


def test_bad_nested_values_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": {"text": [{"role": "user"}]}, "a": {"v": [1]}}) + "\n")
    with pytest.raises(DataError, match=r"row 1: field 'q.text\[0\]' must be an object"):
        load_prompts_file(path, "q.text", "a.v")
    path.write_text(json.dumps({"q": "ok", "a": {"v": [1]}}) + "\n")
    with pytest.raises(DataError, match=r"row 1: field 'a.v' must be a string or a number"):
        load_prompts_file(path, "q", "a.v")
    path.write_text(json.dumps({"q": "ok", "a": "flat"}) + "\n")
    with pytest.raises(DataError, match=r"row 1: missing field 'a.v'"):
        load_prompts_file(path, "q", "a.v")


def test_config_keys_reach_the_loader(tmp_path):
    from conf.load import load_config
    from launch.data.prepare import load_prompts

    path = tmp_path / "custom.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{i}+1=", "sol": {"final": i + 1}}) + "\n"
                            for i in range(4)))
    cfg = load_config(overrides=[f"data.train_path={path}", "data.prompt_key=problem",
                                 "data.answer_key=sol.final"])
    train, held_out = load_prompts(cfg)
    assert [r.answer for r in train] == ["1", "2", "3", "4"] and held_out == []
    cfg = load_config(overrides=[f"data.train_path={path}"])
    with pytest.raises(DataError, match=r"data.train_path: .*row 1: missing field 'prompt'"):
        load_prompts(cfg)


def test_verl_chat_prompts_tokenize_through_the_chat_template(tmp_path):
    from launch.data.prepare import tokenize_prompts
    from launch.models.tiny_model import build_tokenizer

    row = verl_row("unused", "2", "0")
    row["prompt"] = [{"role": "user", "content": "1+1="}]  # the tiny vocabulary has no newline
    records = load_prompts_file(write_verl(tmp_path / "d.parquet", [row]))
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}A:{% endif %}")
    kept, ids, dropped = tokenize_prompts(tokenizer, records, max_tokens=10_000)
    assert kept == records and dropped == 0
    assert tokenizer.decode(ids[0]) == "<user>1+1=A:"


def test_repeated_problems_share_their_prompt_and_are_tokenized_once(tmp_path):
    from launch.data.prepare import tokenize_prompts

    # DAPO-Math-17k repeats each problem, each copy with its own index.
    rows = [verl_row("1+1?", "2", f"copy{i}") for i in range(3)] + [verl_row("2+2?", "4", "other")]
    records = load_prompts_file(write_verl(tmp_path / "d.parquet", rows))
    assert len(records) == 4 and len({r.id for r in records}) == 4
    assert records[0].prompt is records[1].prompt is records[2].prompt
    assert records[0].data_source is records[3].data_source

    calls = []

    class CountingTokenizer:
        chat_template = "any"

        def apply_chat_template(self, messages, **kwargs):
            calls.append(messages)
            return [len(calls)]

    kept, ids, dropped = tokenize_prompts(CountingTokenizer(), records, max_tokens=10)
    assert len(calls) == 2 and ids == [[1], [1], [1], [2]] and dropped == 0
