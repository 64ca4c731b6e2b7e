"""Equivalence of two extracted answers, by math-verify. Runs only in worker processes.

Safety of the parse path (audited against math-verify 0.9.0 / latex2sympy2_extended 1.11):
- Only ``LatexExtractionConfig`` is used. math-verify's ``ExprExtractionConfig`` would
  hand regex-matched text to ``sympy.parse_expr``, which evaluates Python; it is never
  enabled here.
- latex2sympy2_extended tokenises with an ANTLR grammar and builds sympy objects from
  the parse tree. The only strings that reach ``sympify`` are NUMBER tokens, which the
  lexer limits to digits, commas and a dot.
- Parsing uses ANTLR's two-stage strategy (see ``_enable_two_stage_parsing``).
- math-verify's own timeouts use ``signal.alarm``, which fails outside the main thread
  and cannot interrupt C code; they are switched off (``None``). The pool's hard,
  process-killing timeout replaces them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from functools import lru_cache

import sympy
from latex2sympy2_extended.latex2sympy2 import normalize_latex
from math_verify import LatexExtractionConfig, parse, verify

# With its timeouts off, math-verify warns once per process; the pool enforces time.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _enable_two_stage_parsing() -> bool:
    """Parse with ANTLR's SLL prediction first and fall back to full LL on a syntax error.

    The LaTeX grammar is ambiguous around parentheses, brackets and commas, so with
    full-LL prediction (the default) the pure-Python ANTLR runtime re-runs full-context
    prediction on every parse: a tuple like ``(3, 4)`` takes ~80 ms, against ~3 ms with
    SLL. ANTLR guarantees that SLL prediction either yields the parse tree LL would
    yield or reports a syntax error, and latex2sympy's error listener raises on every
    syntax error, so retrying those with LL gives exactly the results of LL alone.
    This is the two-stage strategy the ANTLR authors recommend.

    It wraps private methods of latex2sympy2_extended, so it checks for them and
    leaves the library alone (correct, just slower) when they are missing.
    """
    try:
        from antlr4.atn.PredictionMode import PredictionMode
        from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy
    except ImportError:
        return False
    create_parser = getattr(_Latex2Sympy, "create_parser", None)
    parse_latex = getattr(_Latex2Sympy, "parse", None)
    if create_parser is None or parse_latex is None or getattr(_Latex2Sympy, "_two_stage", False):
        return False

    def create_parser_with_mode(self, latex_str):
        parser = create_parser(self, latex_str)
        parser._interp.predictionMode = getattr(self, "_prediction_mode", PredictionMode.LL)
        return parser

    def parse_two_stage(self, latex_str):
        self._prediction_mode = PredictionMode.SLL
        try:
            return parse_latex(self, latex_str)
        except Exception:
            self._prediction_mode = PredictionMode.LL
            return parse_latex(self, latex_str)

    _Latex2Sympy.create_parser = create_parser_with_mode
    _Latex2Sympy.parse = parse_two_stage
    _Latex2Sympy._two_stage = True
    return True


TWO_STAGE_PARSING = _enable_two_stage_parsing()

_INTEGER_TOKEN = re.compile(r"[0-9]+", re.ASCII)
_FLOAT_TOKEN = re.compile(r"(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][+-]?[0-9]+)?", re.ASCII)


def number_from_token(text: str) -> sympy.Number:
    """``sympy.Number(text)`` for a numeric token, without ``sympify``.

    ``sympy.Number(str)`` goes through ``sympify`` -> ``parse_expr``, which runs
    ``exec("from sympy import *")`` and ``eval`` on every call: about half of all
    parse time, and a string-to-code path we would rather not have at all. For the
    token shapes the grammar produces, sympy's parser yields exactly
    ``Integer(int(text))`` or ``Float(text)``; anything else still goes to sympy.
    """
    if _INTEGER_TOKEN.fullmatch(text):
        return sympy.Integer(int(text))
    if _FLOAT_TOKEN.fullmatch(text):
        return sympy.Float(text)
    return sympy.Number(text)


def _enable_direct_numbers() -> bool:
    """Route latex2sympy's number tokens through :func:`number_from_token`."""
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    parse_number = getattr(_Latex2Sympy, "parse_number", None)
    if parse_number is None or getattr(_Latex2Sympy, "_direct_numbers", False):
        return False

    def parse_number_direct(self, text):
        # Same preprocessing as latex2sympy's parse_number: drop thousands separators
        # and leading zeros of integers.
        text = text.replace(",", "")
        if text.isdigit():
            text = text.lstrip("0") or "0"
        return number_from_token(text)

    _Latex2Sympy.parse_number = parse_number_direct
    _Latex2Sympy._direct_numbers = True
    return True


DIRECT_NUMBERS = _enable_direct_numbers()

_EXTRACTION = (LatexExtractionConfig(),)
# What math-verify applies to a matched \\boxed{...} group (see math_verify.parser.extract_latex).
_NORMALIZATION = replace(_EXTRACTION[0].normalization_config, boxed="last")


@lru_cache(maxsize=8192)
def parse_answer(latex: str) -> tuple:
    """Parsed forms of one answer (sympy objects plus a string fallback), cached.

    The answer is wrapped in ``\\boxed{}`` so math-verify applies exactly its boxed-answer
    normalisation (units, ``\\text{}``, degrees, ``\\dfrac``, ...) to it. References repeat
    across the samples of a prompt, and a GRPO group often repeats answers, so the
    cache saves most parses.
    """
    return tuple(parse("\\boxed{" + latex + "}", list(_EXTRACTION), parsing_timeout=None))


# Text that math-verify's extraction regexes could match differently from the plain
# boxed-answer pattern; such answers skip the normalised-string shortcut below.
_EXTRACTION_SENSITIVE = re.compile(r"\$|\\\(|\\\[|answer", re.IGNORECASE)


@lru_cache(maxsize=8192)
def normalized(latex: str) -> str:
    """The string math-verify parses for ``\\boxed{latex}`` (its normalisation, boxed="last")."""
    return normalize_latex("\\boxed{" + latex + "}", _NORMALIZATION)


def is_equivalent(answer: str, reference: str) -> bool:
    # Equal normalised strings make math-verify parse the same thing on both sides,
    # and it then always reports equality (through its string fallback, if needed).
    if not _EXTRACTION_SENSITIVE.search(answer) and not _EXTRACTION_SENSITIVE.search(reference):
        norm = normalized(reference)
        if norm.strip() and norm == normalized(answer):
            return True
    gold = parse_answer(reference)
    pred = parse_answer(answer)
    if not gold or not pred:
        return False
    # verify() is not symmetric: the reference goes first (it decides how equations,
    # assignments and sets are unwrapped).
    return bool(verify(list(gold), list(pred), timeout_seconds=None))


def score(answer: str, reference: str) -> float:
    try:
        return 1.0 if is_equivalent(answer, reference) else 0.0
    except Exception:  # RecursionError, MemoryError, sympy internals: not equivalent
        return 0.0


# Parsed once in the process that forks the workers, so every worker starts with a warm
# ANTLR prediction cache (the first parse of each shape costs up to ~100x a warm one).
WARM_UP_PAIRS: tuple[tuple[str, str], ...] = (
    ("42", "42"),
    ("-3", "3"),
    ("3.14", "\\pi"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "3/4"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("(1, 2)", "(2, 1)"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("[0, 1)", "(0, 1]"),
    ("45^\\circ", "45"),
    ("\\text{Monday}", "Monday"),
    ("5 \\text{ cm}", "5"),
    ("1.5 \\times 10^{3}", "1500"),
    ("x = 3", "3"),
    ("10\\%", "0.1"),
    ("((1+2)(3+4))", "21"),
)


_warmed = False


def warm_up() -> None:
    global _warmed
    if _warmed:
        return
    for answer, reference in WARM_UP_PAIRS:
        score(answer, reference)
    _warmed = True
