"""The tool-use demo task (data.synthetic.kind=tool_product) and its warm start."""

import random

import pytest

from conf.errors import ConfigError
from conf.load import load_config
from conf.schema import SyntheticTaskConfig, TinyModelConfig, ToolConfig
from launch.data.synthetic import (
    TOOL_SHARE,
    product_program,
    program_output,
    synthetic_problems,
    warm_start_segments,
)
from launch.models.bootstrap import _encode, tiny_model_dir, tool_markers
from launch.models.tiny_model import build_tokenizer
from rollout.multi_turn import Markers, find_code_block, observation_tokens
from rollout.tools.sandbox import Sandbox
from verifier._mathcheck import score
from verifier.extract import extract_answer

TASK = SyntheticTaskConfig(kind="tool_product", min_operand=100, max_operand=999)
MARKERS = Markers("<py>", "</py>", "<out>", "</out>")


def test_problems_are_products_of_operands_in_range():
    for record in synthetic_problems(TASK, 500, seed=3):
        a, b = map(int, record.prompt.rstrip("=").split("*"))
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert int(record.answer) == a * b


def test_a_minority_of_warm_start_responses_call_the_tool_and_all_are_right():
    rng = random.Random(0)
    records = synthetic_problems(TASK, 4000, seed=0)
    responses = [warm_start_segments(TASK.kind, r.prompt, r.answer, rng, MARKERS) for r in records]
    calls = [pieces for pieces in responses if len(pieces) > 1]
    assert abs(len(calls) / len(responses) - TOOL_SHARE) < 0.02
    for record, pieces in zip(records, responses, strict=True):
        text = "".join(t for t, _ in pieces)
        assert score(extract_answer(text), record.answer) == 1.0
        # Only the tool's output is left untrained.
        assert [trained for _, trained in pieces] == ([True, False, True] if len(pieces) > 1 else [True])


def test_the_warm_start_trace_is_what_the_worker_builds(tmp_base):
    """The program is cut where the worker cuts it; the sandbox prints the output the trace
    shows; and the output block has the tokens the worker appends."""
    tokenizer = build_tokenizer()
    record = synthetic_problems(TASK, 1, seed=5)[0]
    code, output, answer = (t for t, _ in _tool_call(record))
    found = find_code_block(code + output + answer, False, MARKERS)
    assert found == (product_program(record.prompt), len(code))
    result = Sandbox(ToolConfig(tmp_dir=tmp_base, timeout_s=10)).run(found[0])
    assert result.observation == program_output(record.answer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, _ = observation_tokens(result.observation, MARKERS, encode, budget=64)
    assert ids == encode(output)


def _tool_call(record):
    rng = random.Random(0)
    while True:
        pieces = warm_start_segments(TASK.kind, record.prompt, record.answer, rng, MARKERS)
        if len(pieces) == 3:
            return pieces


def test_the_warm_start_labels_skip_the_tool_output():
    tokenizer = build_tokenizer()
    record = synthetic_problems(TASK, 1, seed=2)[0]
    pieces = _tool_call(record)
    _, labels = _encode(tokenizer, [record], [pieces])
    prompt, (code, output, _) = len(record.prompt), (t for t, _ in pieces)
    trained = labels[0] != -100
    assert not trained[:prompt].any()
    assert trained[prompt:prompt + len(code)].all()
    assert not trained[prompt + len(code):prompt + len(code) + len(output)].any()
    assert trained[prompt + len(code) + len(output):].all()  # the answer and EOS


def test_the_model_directory_follows_the_markers_only_for_tool_kinds():
    cfg = TinyModelConfig()
    other = ToolConfig(code_start="<c>")
    assert tiny_model_dir("m", cfg, TASK, ToolConfig()) != tiny_model_dir("m", cfg, TASK, other)
    plain = SyntheticTaskConfig()
    assert tiny_model_dir("m", cfg, plain, ToolConfig()) == tiny_model_dir("m", cfg, plain, other) \
        == tiny_model_dir("m", cfg, plain)
    assert tool_markers(plain, other) is None
    assert tool_markers(TASK, None) == Markers()


def test_warm_start_of_a_tool_kind_needs_markers():
    with pytest.raises(ValueError, match="tool_product"):
        warm_start_segments(TASK.kind, "100*100=", "10000", random.Random(0))


def test_the_tool_recipes_load():
    for name in ("tool_grpo", "tool_lp_reg"):
        cfg = load_config(name, [])
        assert cfg.data.synthetic.kind == "tool_product" and cfg.rollout.max_turns > 0
        assert cfg.tool.code_start == "<py>"
    with pytest.raises(ConfigError, match="data.synthetic.kind"):
        load_config("tool_grpo", ["data.synthetic.kind=tool"])
