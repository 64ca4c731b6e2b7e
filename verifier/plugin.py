"""User-written reward functions: ``"package.module:function"``.

The function is called as ``function(response: str, answer: str) -> float`` with the
model's response (its final ``max_response_chars`` characters) and the reference
answer, inside the verifier's worker pool, under the same hard per-sample timeout.
It must return a finite real number (bool, int, float or a numpy scalar); anything
else, or an exception, scores 0.0 and is counted in ``verifier/errors``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

RewardFn = Callable[[str, str], float]


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``spec`` (``"package.module:function"``, the function may be dotted)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(
            f"verifier.reward_fn={spec!r}: expected 'package.module:function'"
        )
    module_name, attr_path = spec.split(":")
    if not module_name or not attr_path:
        raise ValueError(
            f"verifier.reward_fn={spec!r}: expected 'package.module:function'"
        )
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing it
        raise ValueError(
            f"verifier.reward_fn={spec!r}: cannot import module {module_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(
                f"verifier.reward_fn={spec!r}: module {module_name!r} has no attribute "
                f"{attr_path!r}"
            ) from exc
    if not callable(obj):
        raise ValueError(f"verifier.reward_fn={spec!r}: {attr_path!r} is not callable")
    return obj
