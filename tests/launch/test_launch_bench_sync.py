"""``lpreg bench sync``: its pure parts (model shapes, push order, summary and table)."""

import pytest

from launch.benchmarks import sync
from launch.cli.bench import available_benchmarks


def test_bench_discovers_sync():
    assert "sync" in available_benchmarks()


@pytest.mark.parametrize("size", list(sync.SIZES))
def test_each_size_lands_within_15_percent_of_its_name(size):
    count = sync.SIZES[size].num_parameters()
    assert abs(count - sync.ADVERTISED[size]) <= 0.15 * sync.ADVERTISED[size]


@pytest.mark.parametrize("size", list(sync.SIZES))
def test_the_count_from_the_shape_is_the_models_own(size):
    """Built on the meta device: the real Qwen2 module, no weights allocated."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = sync.SIZES[size]
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**shape.qwen2_config(tokenizer_len=98)))
    assert sum(p.numel() for p in model.parameters()) == shape.num_parameters()
    named = list(model.named_parameters(remove_duplicate=False))
    assert len(named) == shape.num_tensors()
    assert sum(p.numel() * 4 for _, p in named) == shape.push_bytes()


def test_every_size_has_the_head_dim_cpu_attention_needs_and_tied_embeddings():
    for shape in sync.SIZES.values():
        config = shape.qwen2_config(tokenizer_len=98)
        assert shape.head_dim == 64 and shape.hidden % shape.heads == 0
        assert config["tie_word_embeddings"] and config["vocab_size"] >= 98


def test_pushes_alternate_abba():
    assert sync.push_order(3) == ["object_store", "broadcast", "broadcast", "object_store",
                                  "object_store", "broadcast"]
    order = sync.push_order(5)
    assert order.count("object_store") == order.count("broadcast") == 5


def test_summary_medians_and_throughput():
    row = sync.summarize(first_s=2.0, timed_s=[0.5, 0.1, 0.2, 0.4, 0.3], num_bytes=60_000_000)
    assert row["median_s"] == pytest.approx(0.3)
    assert (row["min_s"], row["max_s"]) == (0.1, 0.5)
    assert row["mb_per_push"] == pytest.approx(60.0)
    assert row["mb_per_s"] == pytest.approx(200.0)
    assert row["first_s"] == 2.0


def test_ratio_is_broadcast_over_object_store_and_the_table_shows_it():
    result = {"size": "4M", "params": 4_224_768, "workers": 2,
              "object_store": sync.summarize(0.4, [0.2, 0.2, 0.2], 17_000_000),
              "broadcast": sync.summarize(2.0, [0.3, 0.3, 0.3], 17_000_000)}
    assert sync.ratio(result) == pytest.approx(1.5)
    assert sync.ratio(result, "first_s") == pytest.approx(5.0)
    table = sync.format_table([result])
    assert "4,224,768" in table and "1.50" in table and "5.00" in table
    assert len(table.splitlines()) == 3


def test_timeline_seconds_sum_per_actor_then_average_over_actors():
    def event(method, tid, seconds, ph="X"):
        return {"cat": f"task::{method}", "tid": tid, "dur": seconds * 1e6, "ph": ph}

    events = [event("RolloutWorker.update_weights", "w1", 0.2),
              event("RolloutWorker.update_weights", "w2", 0.4),
              event("RolloutWorker.update_weights", "w2", 0.2),  # two calls of one actor add up
              event("Learner.broadcast_weights", "l0", 0.5),
              event("Learner.broadcast_weights", "l0", 9.0, ph="i"),  # not a duration event
              event("RolloutWorker.poll", "w1", 0.5)]
    seconds = sync.timeline_seconds(events, {"RolloutWorker.update_weights": "receive",
                                             "Learner.broadcast_weights": "send"})
    assert seconds == pytest.approx({"receive": 0.4, "send": 0.5})


def test_list_arguments():
    assert sync.parse_list("4M, 200M", sync.SIZES) == ["4M", "200M"]
    assert sync.parse_list("1,2", cast=int) == [1, 2]
    with pytest.raises(Exception, match="unknown"):
        sync.parse_list("7M", sync.SIZES)


def test_the_padded_tokenizer_decodes_every_id_of_the_vocabulary():
    tokenizer = sync.build_tokenizer(300)
    assert len(tokenizer) == 300
    assert tokenizer.decode([299]) == "<x299>"
    assert tokenizer("12")["input_ids"] == tokenizer("1")["input_ids"] + tokenizer("2")["input_ids"]


def test_driver_only_time_is_what_no_actor_call_covers():
    def call(method, actor, start, seconds):
        return {"cat": f"task::{method}", "tid": actor, "ph": "X", "ts": start * 1e6,
                "dur": seconds * 1e6}

    events = [call("Learner.export_weights", "l0", 0.0, 0.4),
              call("RolloutWorker.load_weights", "w0", 0.5, 0.3),
              call("RolloutWorker.load_weights", "w1", 0.6, 0.4),  # overlaps the other engine's
              call("RolloutWorker.poll", "w0", 1.0, 0.5)]  # not on the push's path
    assert sync.uncovered_seconds(events, 0.0, 1.5e6) == pytest.approx(0.1 + 0.5)
    parts = sync.breakdown(events, sync.BREAKDOWN["object_store"], [(0.0, 1.5)])
    assert parts == pytest.approx({"learner export+put": 0.4, "engine get+reload": 0.35,
                                   "driver only": 0.6})
