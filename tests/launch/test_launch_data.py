import json

import pytest

from conf.schema import SyntheticTaskConfig
from launch.data.prompts import DataError, PromptRecord, PromptSampler, load_prompts_file
from launch.data.synthetic import synthetic_problems


def test_synthetic_sums_are_reproducible_and_correct():
    task = SyntheticTaskConfig(kind="sum", num_operands=3, min_operand=10, max_operand=99)
    a = synthetic_problems(task, 20, seed=3)
    assert a == synthetic_problems(task, 20, seed=3)
    assert a != synthetic_problems(task, 20, seed=4)
    for record in a:
        operands = [int(x) for x in record.prompt.rstrip("=").split("+")]
        assert len(operands) == 3 and all(10 <= x <= 99 for x in operands)
        assert int(record.answer) == sum(operands)


def test_synthetic_linear_equations_have_their_answer_as_solution():
    task = SyntheticTaskConfig(kind="linear", min_operand=1, max_operand=50)
    for record in synthetic_problems(task, 20, seed=0):
        lhs, rhs = record.prompt.removesuffix(", x=").split("=")
        a, b = lhs.split("*x+")
        assert int(a) * int(record.answer) + int(b) == int(rhs)


def test_unknown_task_kind_names_the_key():
    with pytest.raises(DataError, match="data.synthetic.kind"):
        synthetic_problems(SyntheticTaskConfig(kind="calculus"), 1, seed=0)


def test_jsonl_rows_load(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": 2}) + "\n\n"
                    + json.dumps({"prompt": "p", "answer": "x", "data_source": "s", "id": "7"}) + "\n")
    rows = load_prompts_file(path)
    assert [r.answer for r in rows] == ["2", "x"]
    assert rows[1].data_source == "s" and rows[1].id == "7"


@pytest.mark.parametrize("line,message", [
    ("{not json", "row 2: not valid JSON"),
    ('{"answer": "1"}', "row 2: missing field 'prompt'"),
    ('{"prompt": "q"}', "row 2: missing field 'answer'"),
    ('{"prompt": 5, "answer": "1"}', "row 2: field 'prompt'"),
    ('[1, 2]', "row 2: expected an object"),
    ('{"prompt": [], "answer": "1"}', "row 2: field 'prompt' is an empty message list"),
    ('{"prompt": [{"role": "user"}], "answer": "1"}', r"row 2: field 'prompt\[0\]'"),
    ('{"prompt": "q", "answer": true}', "row 2: field 'answer'"),
])
def test_malformed_rows_name_file_row_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_prompts_file(path)
    assert str(path) in str(err.value)


def test_sampler_state_round_trips():
    records = synthetic_problems(SyntheticTaskConfig(), 10, seed=0)
    first = PromptSampler(records, 4, seed=1)
    for _ in range(3):
        first.next_batch()
    resumed = PromptSampler(records, 4, seed=1)
    resumed.load_state(first.state())
    assert [first.next_batch() for _ in range(4)] == [resumed.next_batch() for _ in range(4)]


def test_sampler_refuses_batches_larger_than_the_data():
    with pytest.raises(DataError, match="prompts_per_step"):
        PromptSampler(synthetic_problems(SyntheticTaskConfig(), 3, seed=0), 4, seed=0)


def test_synthetic_held_out_set_is_full_size_distinct_and_never_trained_on():
    from conf.load import load_config
    from launch.data.prepare import load_prompts

    # 2-digit sums have only 8,100 distinct problems: a naive split would leave few.
    cfg = load_config(overrides=["data.num_synthetic_train=20000", "data.num_synthetic_eval=500"])
    train, held_out = load_prompts(cfg)
    assert len(held_out) == 500
    assert len({r.prompt for r in held_out}) == 500
    assert not {r.prompt for r in held_out} & {r.prompt for r in train}
    assert len(train) > 10000


def test_parquet_rows_load_and_bad_rows_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"],
                             "data_source": ["a", "b"]}), good)
    rows = load_prompts_file(good)
    assert [(r.prompt, r.answer, r.data_source) for r in rows] == [("1+1=", "2", "a"),
                                                                  ("2+2=", "4", "b")]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", None], "answer": ["2", "4"]}), bad)
    with pytest.raises(DataError, match=r"bad.parquet, row 2: missing field 'prompt'"):
        load_prompts_file(bad)


def test_unknown_format_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="unsupported data format '.csv'"):
        load_prompts_file(path)


def test_chat_prompts_go_through_the_chat_template(tmp_path):
    from launch.data.prepare import prompt_token_ids
    from launch.models.tiny_model import build_tokenizer

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1="}],
                                "answer": "2"}) + "\n")
    record = load_prompts_file(path)[0]
    assert record.is_chat and record.messages() == [{"role": "user", "content": "1+1="}]

    tokenizer = build_tokenizer()
    with pytest.raises(DataError, match="has no chat template"):
        prompt_token_ids(tokenizer, record)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}A:{% endif %}")
    ids = prompt_token_ids(tokenizer, record)
    assert tokenizer.decode(ids) == "<user>1+1=A:"


def test_truncated_responses_get_the_truncated_reward():
    from verifier.shaping import apply_truncated_reward

    scores, reasons = [1.0, 1.0, 0.0], ["stop", "length", "length"]
    assert apply_truncated_reward(scores, reasons, 0.0) == [1.0, 0.0, 0.0]
    assert apply_truncated_reward(scores, reasons, -1.0) == [1.0, -1.0, -1.0]
    assert apply_truncated_reward(scores, reasons, None) == scores


def _tokenizer_with_template():
    from launch.models.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}A:{% endif %}")
    return tokenizer


@pytest.mark.parametrize("mode, expected", [("auto", "<user>1+1=A:"), ("always", "<user>1+1=A:"),
                                            ("never", "1+1=")])
def test_plain_prompts_follow_the_chat_template_mode(mode, expected):
    from launch.data.prepare import prompt_token_ids

    tokenizer = _tokenizer_with_template()
    record = PromptRecord(prompt="1+1=", answer="2", id="p0")
    assert tokenizer.decode(prompt_token_ids(tokenizer, record, mode)) == expected


def test_plain_prompts_stay_plain_without_a_template_unless_it_is_required():
    from launch.data.prepare import prompt_token_ids
    from launch.models.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    record = PromptRecord(prompt="1+1=", answer="2", id="p0")
    assert tokenizer.decode(prompt_token_ids(tokenizer, record, "auto")) == "1+1="
    with pytest.raises(DataError, match=r"prompt 'p0' needs it \(data.chat_template=always\)"):
        prompt_token_ids(tokenizer, record, "always")


def test_unknown_chat_template_mode_names_the_key():
    from conf.load import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.chat_template"):
        load_config(None, ["data.chat_template=sometimes"])


def test_fraction_problems_are_exact_and_in_lowest_terms():
    from fractions import Fraction

    task = SyntheticTaskConfig(kind="fraction", num_operands=3, min_operand=1, max_operand=20)
    records = synthetic_problems(task, 200, seed=3)
    assert records == synthetic_problems(task, 200, seed=3)
    for record in records:
        terms = [Fraction(term) for term in record.prompt.removesuffix("=").split("+")]
        assert len(terms) == 3 and Fraction(record.answer) == sum(terms)
        assert str(sum(terms)) == record.answer  # lowest terms, and "p" when whole
    assert any("/" not in r.answer for r in records) and any("/" in r.answer for r in records)


def test_fraction_answers_verify_in_latex_form():
    from verifier import MathVerifier

    task = SyntheticTaskConfig(kind="fraction", min_operand=1, max_operand=9)
    record = next(r for r in synthetic_problems(task, 50, seed=0) if "/" in r.answer)
    p, q = record.answer.split("/")
    with MathVerifier(num_workers=1) as verifier:
        scores = verifier.score_batch([f"\\boxed{{\\frac{{{p}}}{{{q}}}}}", f"\\boxed{{{p}}}"],
                                      [record.answer] * 2)
    assert scores == [1.0, 0.0]


@pytest.mark.parametrize("override, key", [("data.synthetic.kind=matrix", "data.synthetic.kind"),
                                           ("data.synthetic.min_operand=100",
                                            "data.synthetic.min_operand")])
def test_bad_synthetic_task_names_the_key_when_the_config_loads(override, key):
    from conf.load import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
