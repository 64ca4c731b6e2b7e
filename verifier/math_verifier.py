"""The reward function of lpreg: model responses and reference answers in, rewards out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from verifier.extract import DEFAULT_BOXED_COMMANDS, extract_answer, nesting_depth, quick_verdict
from verifier.plugin import load_reward_fn
from verifier.pool import ScoringPool, Status

if TYPE_CHECKING:
    from conf.schema import VerifierConfig

logger = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    """Rewards of one batch plus what the driver logs about them."""

    scores: list[float]
    timeouts: int = 0  # samples whose scoring ran past timeout_s (they score 0)
    no_answer: int = 0  # responses with no final answer (math reward only)
    errors: int = 0  # reward_fn raised / returned junk, or a worker died twice on a sample
    score_s: float = 0.0  # wall-clock seconds spent scoring the batch
    error_messages: list[str] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        n = len(self.scores)
        return {
            "verifier/timeouts": float(self.timeouts),
            "verifier/no_answer_frac": self.no_answer / n if n else 0.0,
            "verifier/errors": float(self.errors),
            "verifier/score_s": self.score_s,
        }


class MathVerifier:
    """Scores responses against reference answers, safely and in bounded time.

    Built-in math reward (``reward_fn=None``):
      - the final answer is the content of the last ``\\boxed{...}`` / ``\\fbox{...}``
        (``boxed_commands``), else the last ``Answer: ...`` line (``answer_line_fallback``);
      - it is compared with the reference by math-verify (sympy) in worker processes:
        1.0 when equivalent, 0.0 otherwise;
      - a response without a final answer scores ``-format_penalty`` (0.0 by default);
      - an answer longer than ``max_answer_chars`` or nested deeper than
        ``max_answer_depth`` scores 0.0 without being parsed (no real answer looks
        like that, and the parser is superlinear in nesting depth);
      - only the final ``max_response_chars`` characters of a response are searched.
      References containing ``\\boxed{...}`` are reduced to its content the same way.

    Plugin reward (``reward_fn="package.module:function"``): ``function(response, answer)
    -> float`` runs in the same pool under the same timeout; its value is the reward.
    ``format_penalty`` must then be 0 (fold any penalty into the function).

    Any sample that runs past ``timeout_s`` scores 0.0 and counts in ``timeouts``.
    Calls from several threads are serialised.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        *,
        reward_fn: str | None = None,
        format_penalty: float = 0.0,
        boxed_commands: Sequence[str] = DEFAULT_BOXED_COMMANDS,
        answer_line_fallback: bool = True,
        max_response_chars: int = 100_000,
        max_answer_chars: int = 1_000,
        max_answer_depth: int = 24,
        worker_memory_mb: int | None = 4096,
        park_after_s: float | None = None,
    ) -> None:
        if reward_fn is not None:
            # Import in the parent too, so a bad spec fails here, before training starts.
            load_reward_fn(reward_fn)
            if format_penalty:
                raise ValueError(
                    "verifier.format_penalty applies to the built-in math reward only; "
                    f"with verifier.reward_fn={reward_fn!r} include it in that function"
                )
        if max_response_chars < 1 or max_answer_chars < 1:
            raise ValueError("max_response_chars and max_answer_chars must be >= 1")
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers)
        self.reward_fn = reward_fn
        self.format_penalty = float(format_penalty)
        self.boxed_commands = tuple(boxed_commands)
        self.answer_line_fallback = bool(answer_line_fallback)
        self.max_response_chars = int(max_response_chars)
        self.max_answer_chars = int(max_answer_chars)
        self.max_answer_depth = int(max_answer_depth)
        self._lock = threading.Lock()
        self._pool = ScoringPool(
            num_workers=self.num_workers,
            timeout_s=self.timeout_s,
            mode="math" if reward_fn is None else "plugin",
            reward_fn_spec=reward_fn,
            memory_mb=worker_memory_mb,
            park_after_s=park_after_s,
        )

    @classmethod
    def from_config(cls, cfg: VerifierConfig, **overrides: Any) -> MathVerifier:
        kwargs: dict[str, Any] = dict(
            timeout_s=cfg.timeout_s,
            num_workers=cfg.num_workers,
            reward_fn=cfg.reward_fn,
            format_penalty=cfg.format_penalty,
            boxed_commands=tuple(cfg.boxed_commands),
            answer_line_fallback=cfg.answer_line_fallback,
            max_response_chars=cfg.max_response_chars,
            max_answer_chars=cfg.max_answer_chars,
            worker_memory_mb=cfg.worker_memory_mb or None,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    # ---- lifecycle -----------------------------------------------------------------

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the workers have started (scoring also waits for them)."""
        self._pool.wait_ready(timeout_s)

    def worker_pids(self) -> list[int]:
        return self._pool.worker_pids()

    def close(self) -> None:
        """Terminate the worker processes. Idempotent."""
        with self._lock:
            self._pool.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- scoring -------------------------------------------------------------------

    def extract(self, response: str) -> str | None:
        """The final answer the built-in reward would grade, or None."""
        return extract_answer(
            response[-self.max_response_chars :],
            boxed_commands=self.boxed_commands,
            answer_line_fallback=self.answer_line_fallback,
        )

    def _reference(self, answer: str) -> str:
        answer = str(answer)
        if "\\boxed" in answer or "\\fbox" in answer:
            return extract_answer(answer, answer_line_fallback=False) or answer.strip()
        return answer.strip()

    def score_batch(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Rewards, one per response: 1.0 correct, 0.0 otherwise (see the class doc)."""
        return self.score_batch_detailed(responses, answers).scores

    def score_batch_detailed(self, responses: Sequence[str], answers: Sequence[str]) -> ScoreReport:
        with self._lock:
            return self._score(responses, answers)

    def _score(self, responses: Sequence[str], answers: Sequence[str]) -> ScoreReport:
        if self._pool.closed:
            raise RuntimeError("MathVerifier is closed")
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        start = time.perf_counter()
        n = len(responses)
        scores = [0.0] * n
        report = ScoreReport(scores=scores)

        # Identical (answer, reference) pairs are scored once: the samples of a GRPO
        # group often agree, and a repeated bomb should cost one timeout, not several.
        pairs: dict[tuple[str, str], list[int]] = {}
        for i, (response, answer) in enumerate(zip(responses, answers, strict=True)):
            response = response if isinstance(response, str) else str(response)
            if self.reward_fn is not None:
                pairs.setdefault((response[-self.max_response_chars :], str(answer)), []).append(i)
                continue
            extracted = self.extract(response)
            if extracted is None:
                report.no_answer += 1
                scores[i] = 0.0 - self.format_penalty  # 0.0, not -0.0, by default
                continue
            if len(extracted) > self.max_answer_chars or nesting_depth(extracted) > self.max_answer_depth:
                continue  # scores 0.0
            reference = self._reference(answer)
            verdict = quick_verdict(extracted, reference)
            if verdict is not None:
                scores[i] = 1.0 if verdict else 0.0
                continue
            pairs.setdefault((extracted, reference), []).append(i)

        if pairs:
            keys = list(pairs)
            for key, outcome in zip(keys, self._pool.run(keys), strict=True):
                for i in pairs[key]:
                    scores[i] = outcome.score
                    if outcome.status is Status.TIMEOUT:
                        report.timeouts += 1
                    elif outcome.status is Status.ERROR:
                        report.errors += 1
                if outcome.error and len(report.error_messages) < 5:
                    report.error_messages.append(outcome.error)
            if report.error_messages:
                logger.warning(
                    "verifier: %d sample(s) failed to score; first error: %s",
                    report.errors,
                    report.error_messages[0],
                )
        report.score_s = time.perf_counter() - start
        return report
