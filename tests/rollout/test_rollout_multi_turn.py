"""Multi-turn responses in a worker's book (no vLLM): where a code block closes, what the
observation adds, and what each token carries."""

from rollout.multi_turn import (
    Markers,
    MultiTurn,
    code_open_at_end,
    cut_at_code_block,
    find_code_block,
    observation_tokens,
)
from rollout.sample_book import SampleBook
from rollout.types import GroupRequest, SamplingSettings, ToolCall

# Single characters, then pieces that split the markers "<c>" and "</c>" across tokens.
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789=+()<>/ ")
VOCAB = CHARS + ["<c", "</", "c>", "<c>", "</c>"]
MARKERS = Markers(code_start="<c>", code_end="</c>", output_start="<o>", output_end="</o>")


def ids(*pieces):
    return [VOCAB.index(p) for p in pieces]


def decode(token_ids):
    return "".join(VOCAB[i] for i in token_ids)


def encode(text):
    return [CHARS.index(ch) for ch in text]


def book(max_turns=2):
    return SampleBook(0, decode, MultiTurn(max_turns, MARKERS, encode))


def group(prompt="q", max_tokens=40, n=1):
    return GroupRequest("g", encode(prompt), SamplingSettings(
        samples_per_prompt=n, temperature=1.0, top_p=1.0, max_response_tokens=max_tokens, seed=5))


def test_a_block_is_found_only_once_closed_and_a_prompt_may_open_it():
    assert find_code_block("x<c>print(1)", False, MARKERS) is None
    assert find_code_block("x<c>print(1)</c>tail", False, MARKERS) == ("print(1)", 16)
    assert find_code_block("print(1)</c>", True, MARKERS) == ("print(1)", 12)
    assert code_open_at_end("solve: <c>", MARKERS)
    assert not code_open_at_end("<c>1</c> then", MARKERS)


def test_a_marker_split_across_tokens_is_cut_after_the_token_that_completes_it():
    turn = ids("a", "<c", ">", "1", "</", "c>", "b", "c")  # "a<c>1</c>bc"
    assert cut_at_code_block(turn, 0, False, MARKERS, decode) == ("1", 6)
    assert cut_at_code_block(turn[:5], 0, False, MARKERS, decode) is None  # "</" alone is not the end


def test_observation_is_cut_to_the_budget_left():
    assert observation_tokens("12", MARKERS, encode, 100) == (encode("<o>12</o>"), False)
    assert observation_tokens("12", MARKERS, encode, 4) == (encode("<o>1"), True)


def test_multi_turn_sample_carries_mask_logprobs_and_versions_per_token():
    b = book()
    (sample,) = b.add_group(group())
    request = b.start(sample, version=3)
    # The engine's output: "a<c>1+1</c>zz"; the two tokens after the block are dropped.
    turn = ids("a", "<c", ">", "1", "+", "1", "</", "c>", "z", "z")
    lps = [-0.1 * (i + 1) for i in range(len(turn))]
    top = ([[t] for t in turn], [[lp] for lp in lps])
    assert b.on_output(request.request_id, turn, lps, None, None, top) is None
    (call,) = b.take_calls()
    assert (call.code, call.request_id, call.sample is sample) == ("1+1", "g/0/0", True)
    assert b.running == {}  # the worker aborts that request
    # The tool answers after a weight update: the next turn is version 4.
    assert b.add_observation(sample, "2", "ok", 0.5) is sample
    observation = encode("<o>2</o>")
    follow = b.start(sample, version=4)
    assert follow.prompt_token_ids == encode("q") + turn[:8] + observation
    assert follow.max_tokens == 40 - 8 - len(observation)
    assert follow.request_id == "g/0/1"
    done = b.on_output(follow.request_id, ids("o", "k"), [-1.0, -2.0], "stop", None,
                       ([[1], [2]], [[-1.0], [-2.0]]))
    (s,) = done.samples
    assert s.response_token_ids == turn[:8] + observation + ids("o", "k")
    assert s.response_mask == [1] * 8 + [0] * len(observation) + [1, 1]
    assert s.response_logprobs == lps[:8] + [0.0] * len(observation) + [-1.0, -2.0]
    assert s.token_versions == [3] * 8 + [3] * len(observation) + [4, 4]
    assert s.response_top_token_ids == top[0][:8] + [[]] * len(observation) + [[1], [2]]
    assert s.tool_calls == [ToolCall("ok", 0.5, len(observation))]
    assert s.response_text == "a<c>1+1</c><o>2</o>ok"


def test_a_weight_update_inside_a_turn_keeps_each_tokens_version_and_the_block():
    b = book()
    (sample,) = b.add_group(group(prompt="q<c>"))  # the prompt opens the block
    request = b.start(sample, version=0)
    b.on_output(request.request_id, ids("1", "</"), [-0.5, -0.6], None, None)
    continuations, aborted = b.interrupt_all()
    assert continuations == [sample] and aborted == [request.request_id]
    request = b.start(sample, version=1)
    b.on_output(request.request_id, ids("c>", "x"), [-0.7, -0.8], None, None)
    (call,) = b.take_calls()
    assert call.code == "1"
    assert sample.tokens == ids("1", "</", "c>") and sample.versions == [0, 0, 1]


def test_max_turns_bounds_the_calls_and_max_tokens_the_whole_response():
    b = book(max_turns=1)
    (sample,) = b.add_group(group(max_tokens=10))
    request = b.start(sample, version=0)
    b.on_output(request.request_id, ids("<c>", "1", "</c>"), [-1.0] * 3, None, None)
    b.take_calls()
    # 10 - 3 = 7 tokens left, the block "<o>12345</o>" needs 12: cut, and the response ends.
    done = b.add_observation(sample, "12345", "ok", 0.1)
    (s,) = done.samples
    assert s.finish_reason == "length" and len(s.response_token_ids) == 10
    assert s.response_mask == [1, 1, 1] + [0] * 7
    assert s.tool_calls == [ToolCall("ok", 0.1, 7)]

    b = book(max_turns=1)
    (sample,) = b.add_group(group())
    request = b.start(sample, version=0)
    b.on_output(request.request_id, ids("<c>", "1", "</c>"), [-1.0] * 3, None, None)
    b.take_calls()
    request = b.start(b.add_observation(sample, "1", "error", 0.1), version=0)
    # No call left: a second block is just text.
    assert b.on_output(request.request_id, ids("<c>", "2", "</c>"), [-1.0] * 3, "stop", None)
    assert b.take_calls() == []


def test_a_dropped_group_ignores_its_late_observation():
    b = book()
    (sample,) = b.add_group(group())
    request = b.start(sample, version=0)
    b.on_output(request.request_id, ids("<c>", "1", "</c>"), [-1.0] * 3, None, None)
    b.take_calls()
    b.drop_all()
    assert b.add_observation(sample, "1", "ok", 0.1) is None
