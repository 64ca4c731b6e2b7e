"""A program's output, bounded: the head and the tail kept, the middle counted."""

from rollout.tools.output import BoundedOutput, truncate, truncation_marker


def collect(chunks, max_chars):
    out = BoundedOutput(max_chars)
    for chunk in chunks:
        out.feed(chunk)
    return out.text(), out.omitted


def test_output_within_the_bound_is_kept_whole():
    assert collect([b"abc", b"def\n"], 7) == ("abcdef\n", 0)
    assert collect([], 5) == ("", 0)


def test_long_output_keeps_its_head_and_tail_and_counts_the_rest():
    text, omitted = collect([b"0123456789"] * 10, 10)
    assert omitted == 90
    assert text == "01234" + truncation_marker(90) + "56789"


def test_characters_split_across_reads_are_whole_again():
    data = "é€𝄞".encode() * 3
    chunks = [data[i:i + 1] for i in range(len(data))]
    assert collect(chunks, 100) == ("é€𝄞" * 3, 0)
    text, omitted = collect(chunks, 4)
    assert (text, omitted) == ("é€" + truncation_marker(5) + "€𝄞", 5)


def test_invalid_bytes_become_replacement_characters():
    assert collect([b"a\xffb"], 10) == ("a\ufffdb", 0)


def test_a_bound_of_one_keeps_only_the_first_character():
    assert collect([b"xyz"], 1) == ("x" + truncation_marker(2), 2)


def test_truncate_cuts_a_string_the_same_way():
    assert truncate("short", 10) == ("short", False)
    assert truncate("0123456789" * 10, 10) == ("01234" + truncation_marker(90) + "56789", True)
