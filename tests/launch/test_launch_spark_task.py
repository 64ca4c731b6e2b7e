import math
import random

import pytest
import torch

from conf.schema import SyntheticTaskConfig
from launch.data.synthetic import (
    DISTRACTORS,
    SPARK_SHARE,
    SPARK_TOKEN,
    final_answer,
    spark_response,
    synthetic_problems,
    warm_start_response,
)
from verifier._mathcheck import score
from verifier.extract import extract_answer

TASK = SyntheticTaskConfig(kind="spark_sum", num_operands=4, min_operand=10, max_operand=99)


def _responses(n=4000, seed=0):
    rng = random.Random(seed)
    return [(r, warm_start_response(TASK.kind, r.prompt, r.answer, rng))
            for r in synthetic_problems(TASK, n, seed=seed)]


def test_spark_share_at_the_decision_position_is_rare_with_a_noise_tail():
    pairs = _responses()
    # The decision position: the token right after the first answer's closing brace.
    after = [text[text.index("}") + 1:text.index("}") + 2] for _, text in pairs]
    spark = sum(c == SPARK_TOKEN for c in after) / len(after)
    noise = sum(c in DISTRACTORS for c in after) / len(after)
    assert 0.05 <= spark <= 0.15 and abs(spark - SPARK_SHARE) < 0.02
    assert 0.02 <= noise <= 0.06
    assert len({c for c in after if c in DISTRACTORS}) == len(DISTRACTORS)
    assert max(len(text) for _, text in pairs) <= 50 and min(len(text) for _, text in pairs) >= 5


def test_both_paths_end_in_the_right_answer_as_the_verifier_reads_it():
    pairs = _responses(2000, seed=1)
    sparks = [(r, t) for r, t in pairs if SPARK_TOKEN in t]
    # Some spark responses correct a wrong guess; the recheck is what makes them right.
    assert sparks and any(final_answer(t[:t.index("}") + 1]) != r.answer for r, t in sparks)
    for record, text in pairs:
        assert final_answer(text) == record.answer
        assert extract_answer(text) == record.answer and score(extract_answer(text), record.answer) == 1.0


def test_the_recheck_is_running_sums_and_a_wrong_final_answer_scores_zero():
    text = next(t for seed in range(200)
                if SPARK_TOKEN in (t := spark_response("12+34+56+78=", "180", random.Random(seed))))
    assert text.endswith(f"{SPARK_TOKEN}12+34=46+56=102+78=180\\boxed{{180}}")
    wrong = "\\boxed{180}W12+34=46+56=102+78=181\\boxed{181}"
    assert score(extract_answer(wrong), "180") == 0.0
    assert score(extract_answer("\\boxed{180}#"), "180") == 1.0


def test_other_kinds_keep_the_plain_boxed_response():
    rng = random.Random(0)
    assert all(warm_start_response("sum", "1+2=", "3", rng) == "\\boxed{3}" for _ in range(50))
    assert rng.random() == random.Random(0).random()  # drew nothing


def test_the_sampled_calibration_counts_every_sample_once(tmp_path):
    from conf.schema import TinyModelConfig
    from launch.models.bootstrap import spark_calibration
    from launch.models.tiny_model import build_tiny_model, load_tiny_model

    model, tokenizer = load_tiny_model(build_tiny_model(tmp_path / "m", TinyModelConfig(warm_start_steps=0)))
    records = synthetic_problems(TASK, 10, seed=0)
    first = spark_calibration(model, tokenizer, records, samples=3, seed=4)
    assert first["samples"] == 30
    assert all(0.0 <= first[k] <= 1.0 for k in ("spark_frac", "distractor_frac", "direct_accuracy",
                                                 "spark_accuracy"))
    assert spark_calibration(model, tokenizer, records, samples=3, seed=4) == first  # seeded
    # A random model is near uniform: just after the first answer it gives W about 1/V.
    vocab = len(tokenizer)
    assert 0.8 * math.log(vocab) < first["decision_entropy"] <= math.log(vocab)
    assert 0.3 / vocab < first["decision_spark_prob"] < 3 / vocab
    assert first["decision_spark_prob"] + first["decision_distractor_prob"] + first["decision_end_prob"] < 1


class _CharTokenizer:
    """One id per character, 0 the end of the response: enough for decision_position."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_the_decision_position_reads_the_spark_the_distractors_and_the_end():
    from launch.models.bootstrap import decision_position

    probs = torch.zeros(2, 128)
    probs[0, 0], probs[0, ord(SPARK_TOKEN)], probs[0, ord("#")], probs[0, ord("?")] = 0.7, 0.2, 0.05, 0.05
    probs[1, 0] = 1.0  # certain to end: no entropy
    found = decision_position(probs, _CharTokenizer())
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 2 * 0.05 * math.log(0.05))
    assert found["decision_entropy"] == pytest.approx(entropy / 2)
    assert found["decision_spark_prob"] == pytest.approx(0.1)
    assert found["decision_distractor_prob"] == pytest.approx(0.05)
    assert found["decision_end_prob"] == pytest.approx(0.85)


def test_next_token_probs_do_not_depend_on_the_padding(tmp_path):
    from conf.schema import TinyModelConfig
    from launch.models.bootstrap import next_token_probs
    from launch.models.tiny_model import build_tiny_model, load_tiny_model

    model, tokenizer = load_tiny_model(build_tiny_model(tmp_path / "m", TinyModelConfig(warm_start_steps=0)))
    short, long = "1+2+3+4=\\boxed{9}", "11+22+33+44=\\boxed{110}"
    alone = next_token_probs(model, tokenizer, [short])
    padded = next_token_probs(model, tokenizer, [short, long])  # short is left-padded here
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert torch.allclose(padded.sum(-1), torch.ones(2), atol=1e-5)
