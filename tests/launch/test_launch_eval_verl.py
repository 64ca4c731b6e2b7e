"""`lpreg eval data=FILE.parquet` on verl-layout benchmark files, broken down by data_source."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.load import load_config
from launch.cli.eval import expand_shorthands, format_result
from launch.data.prepare import load_prompts
from launch.training.evaluation import EvalResult, summarize


def write_benchmark(path, sources_and_answers: list[tuple[str, str]]):
    rows = [{"data_source": source,
             "prompt": [{"role": "user", "content": f"Problem {i}. Answer: $Answer"}],
             "ability": "MATH",
             "reward_model": {"ground_truth": answer, "style": "rule"},
             "extra_info": {"index": i, "split": "test"}}
            for i, (source, answer) in enumerate(sources_and_answers)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_benchmark_file_evaluates_per_data_source(tmp_path):
    path = write_benchmark(tmp_path / "aime.parquet", [
        ("aime24", "204"), ("aime24", "25"), ("aime25", "70"), ("aime25", "588"), ("aime25", "16")])
    cfg = load_config(overrides=expand_shorthands([f"data={path}"]))
    assert cfg.data.eval_path == str(path) and cfg.data.train_path is None

    _, records = load_prompts(cfg)
    assert [r.answer for r in records] == ["204", "25", "70", "588", "16"]
    assert [r.id for r in records] == [f"aime-{i}" for i in range(5)]

    # Two samples per problem, as with trainer.eval_samples=2.
    scores = [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    metrics = summarize(records, scores, k=2)
    assert metrics["eval/num_problems/aime24"] == 2 and metrics["eval/num_problems/aime25"] == 3
    assert metrics["eval/mean@2/aime24"] == pytest.approx(0.5)
    assert metrics["eval/mean@2/aime25"] == pytest.approx(0.5 / 3)
    assert metrics["eval/pass@2/aime24"] == pytest.approx(0.5)
    assert metrics["eval/pass@2/aime25"] == pytest.approx(1 / 3)
    assert metrics["eval/mean@2"] == pytest.approx(1.5 / 5)

    lines = format_result(EvalResult(step=0, metrics=metrics)).splitlines()
    assert lines[0].startswith("eval/mean@2 ")  # overall first, then each source
    assert any(line.startswith("eval/pass@2/aime25") for line in lines)


def test_eval_file_uses_the_configured_keys(tmp_path):
    path = tmp_path / "bench.parquet"
    pq.write_table(pa.table({"question": ["1+1=", "2+2="], "final": ["2", "4"],
                             "data_source": ["gsm8k", "gsm8k"]}), path)
    cfg = load_config(overrides=expand_shorthands(
        [f"data={path}", "data.prompt_key=question", "data.answer_key=final"]))
    _, records = load_prompts(cfg)
    metrics = summarize(records, [[1.0], [0.0]], k=1)
    assert metrics["eval/accuracy/gsm8k"] == 0.5


def test_eval_print_config_takes_a_parquet_file(tmp_path, capsys):
    from launch.cli.main import main

    path = write_benchmark(tmp_path / "aime.parquet", [("aime24", "1")])
    assert main(["eval", "--print-config", f"data={path}"]) == 0
    assert f"eval_path: {path}" in capsys.readouterr().out
