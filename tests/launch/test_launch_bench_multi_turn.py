"""``lpreg bench multi_turn``: its arguments, settings and the arithmetic of its table."""

import subprocess
import sys
import time

import pytest

from launch.benchmarks import multi_turn
from launch.cli.bench import available_benchmarks
from rollout.types import GroupResult, Sample, ToolCall


def test_bench_discovers_multi_turn():
    assert "multi_turn" in available_benchmarks()


def test_defaults_and_options():
    args = multi_turn.parse_args([])
    assert (args.prompts, args.n, args.max_tokens, args.rounds, args.max_turns) == (4, 4, 512, 3, 4)
    assert args.tool_sleep == 0.0 and args.json is None
    args = multi_turn.parse_args(["--prompts", "2", "--n", "3", "--max-tokens", "128", "--rounds", "1",
                                  "--max-turns", "2", "--tool-sleep", "0.2", "--json", "out.json"])
    assert (args.prompts, args.n, args.max_tokens, args.rounds, args.max_turns) == (2, 3, 128, 1, 2)
    assert args.tool_sleep == 0.2 and args.json == "out.json"


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--max-turns", "0"], ["--tool-sleep", "-1"]])
def test_settings_that_measure_nothing_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        multi_turn.parse_args(argv)
    assert "must" in capsys.readouterr().err


def test_the_two_sides_differ_only_in_their_turns():
    args = multi_turn.parse_args(["--max-turns", "3", "--max-tokens", "300"])
    single, multi = (multi_turn.rollout_config(args, side, 310) for side in ("single", "multi"))
    assert (single.max_turns, multi.max_turns) == (0, 3)
    single.max_turns = multi.max_turns
    assert single == multi
    assert multi.max_response_tokens == 300 and multi.max_model_len == 310


def test_tool_settings_force_the_markers_and_keep_the_sandbox():
    from conf.schema import ToolConfig

    args = multi_turn.parse_args(["--tool-concurrency", "2"])
    tools = multi_turn.tool_config(args, "/opt/python")
    assert (tools.code_start, tools.code_end) == (multi_turn.CODE_START, multi_turn.CODE_END)
    assert tools.max_concurrency == 2 and tools.python == "/opt/python"
    assert (tools.sandbox, tools.timeout_s) == (ToolConfig().sandbox, ToolConfig().timeout_s)


def test_every_prompt_opens_a_code_block_of_one_token_markers():
    from launch.models.tiny_model import build_tokenizer
    from rollout.multi_turn import Markers, code_open_at_end

    tokenizer = build_tokenizer()
    prompts = multi_turn.synthetic_prompt_ids(tokenizer, 3)
    markers = Markers(multi_turn.CODE_START, multi_turn.CODE_END, multi_turn.OUTPUT_START,
                      multi_turn.OUTPUT_END)
    assert all(code_open_at_end(tokenizer.decode(p), markers) for p in prompts)
    for marker in (multi_turn.CODE_START, multi_turn.CODE_END):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


def _sample(model: int, observed: int, calls: int) -> Sample:
    mask = [1] * model + [0] * observed if calls else []
    return Sample(0, [1], [5] * (model + observed), [0.0] * (model + observed), "length", 0, 0,
                  response_mask=mask, tool_calls=[ToolCall("error", 0.1, 1)] * calls if calls else None)


def test_rounds_count_model_and_observation_tokens_apart():
    groups = [GroupResult("g", [_sample(6, 4, 2), _sample(10, 0, 0)], 0, 1.0)]
    r = multi_turn.count_round("multi", 2.0, groups, (1.5, 0.5))
    assert (r.samples, r.model_tokens, r.observation_tokens, r.calls) == (2, 16, 4, 2)
    assert (r.tool_wait_s, r.tool_idle_s) == (1.5, 0.5)


def test_summary_ratios_and_shares():
    R = multi_turn.Round
    rounds = [R("single", 1.0, 2, 200, 0, 0), R("multi", 2.0, 2, 100, 100, 4, 1.0, 0.25),
              R("multi", 1.0, 2, 120, 80, 2, 0.5, 0.25), R("single", 2.0, 2, 200, 0, 0),
              R("single", 1.0, 2, 300, 0, 0), R("multi", 1.0, 2, 90, 110, 2, 0.5, 0.0)]
    result = multi_turn.summarize(rounds)
    assert result["single"]["model_tokens_per_s"] == 200.0  # median of 200, 100, 300
    assert result["multi"]["model_tokens_per_s"] == 90.0  # median of 50, 120, 90
    assert result["ratio_multi_over_single"] == pytest.approx(0.45)
    assert result["multi"]["model_tokens_per_answer"] == pytest.approx(310 / 6)
    assert result["multi"]["observation_tokens_per_answer"] == pytest.approx(290 / 6)
    assert result["multi"]["calls_per_answer"] == pytest.approx(8 / 6)
    assert result["tool_wait_share"] == pytest.approx(2.0 / 4.0)
    assert result["engine_idle_while_waiting_share"] == pytest.approx(0.5 / 4.0)
    assert result["engine_busy_while_waiting_share"] == pytest.approx(1.5 / 4.0)
    assert result["tool/engine_idle_frac"] == pytest.approx(0.25)
    result["workload"] = "test"
    table = multi_turn.format_table(result)
    assert "ratio multi/single" in table and "0.450" in table and "12.5%" in table


def test_the_sleepy_interpreter_sleeps_before_any_program(tmp_path):
    python = multi_turn.sleepy_python(sys.executable, tmp_path / "venv", 0.3)
    start = time.perf_counter()
    out = subprocess.run([python, "-c", "print('ran')"], capture_output=True, text=True, check=True)
    assert out.stdout == "ran\n" and time.perf_counter() - start >= 0.3
