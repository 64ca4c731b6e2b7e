"""A verl-layout Parquet file trains as it is, with dynamic sampling on.

The file has verl's nested columns (``reward_model.ground_truth``, ``extra_info``). The
reward reads the answer from ``reward_model.ground_truth`` and gives every even answer a
flat 0, so those groups have equal rewards: dynamic sampling drops them and draws more
prompts until the step's batch is full.
"""

from __future__ import annotations

import pytest
from harness import Run, by_step, read_metrics

pytestmark = pytest.mark.integration

STEPS, PROMPTS, SAMPLES = 3, 8, 4


def write_verl_parquet(path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "toy_sums", "prompt": f"{a}+{b}=",
             "reward_model": {"ground_truth": str(a + b), "style": "rule"},
             "extra_info": {"index": f"q{a}", "split": "train"}}
            for a, b in ((a, 5) for a in range(10, 74))]  # half the sums are even
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("data_source", pa.string()), ("prompt", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.string()), ("split", pa.string())]))]))
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def verl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("verl")
    data = out / "train.parquet"
    write_verl_parquet(data)
    args = [f"trainer.total_steps={STEPS}", "trainer.run_name=verl", f"trainer.output_dir={out}",
            f"data.train_path={data}", f"data.prompts_per_step={PROMPTS}",
            f"rollout.samples_per_prompt={SAMPLES}", "rollout.num_workers=1",
            "learner.num_workers=1", "learner.micro_batch_size=8",
            "algorithm.filter_groups=true", "algorithm.max_generation_rounds=4",
            "verifier.reward_fn=toy_rewards:digit_share_on_odd_answers",
            "verifier.truncated_reward=null", "rollout.max_response_tokens=24",
            "trainer.eval_every=-1", "model.tiny.warm_start_steps=0",
            f"model.cache_dir={out / 'models'}", "trainer.progress_bar=false"]
    run = Run(args, out / "verl", out / "verl.log")
    code, left = run.finish()
    return {"code": code, "log": run.log(), "metrics": by_step(read_metrics(run.run_dir))}


def test_a_verl_parquet_file_trains(verl_run):
    assert verl_run["code"] == 0, verl_run["log"][-6000:]
    assert sorted(verl_run["metrics"]) == list(range(1, STEPS + 1))


def test_equal_reward_groups_are_dropped_and_the_batch_refilled(verl_run):
    records = verl_run["metrics"].values()
    # Half the answers are even: their groups were dropped...
    assert sum(r["rollout/filtered_groups"] for r in records) >= STEPS
    # ...and more rounds refilled every batch to full size.
    assert any(r["rollout/generation_rounds"] > 1 for r in records)
    for record in records:
        assert record["rollout/kept_groups"] >= PROMPTS
        assert record["rollout/num_samples"] == PROMPTS * SAMPLES


def test_rewards_come_from_the_ground_truth_column(verl_run):
    # Only odd answers from reward_model.ground_truth earn anything; a wrong column would
    # fail int() or give every group a flat 0.
    assert all(r["reward/max"] > 0 for r in verl_run["metrics"].values())
