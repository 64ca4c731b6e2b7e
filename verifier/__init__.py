"""Rewards for RLVR: final-answer extraction and math equivalence, in a bounded pool.

Model output is untrusted: it is never passed to eval, exec, sympify on raw strings or
pickle, and every sample is scored in a worker process that is killed when it runs past
its timeout. See :class:`MathVerifier`.
"""

from verifier.extract import extract_answer, extract_answer_line, extract_boxed
from verifier.math_verifier import MathVerifier, ScoreReport
from verifier.plugin import load_reward_fn
from verifier.pool import Outcome, ScoringPool, Status, WorkerStartError

__all__ = [
    "MathVerifier",
    "Outcome",
    "ScoreReport",
    "ScoringPool",
    "Status",
    "WorkerStartError",
    "extract_answer",
    "extract_answer_line",
    "extract_boxed",
    "load_reward_fn",
]
