"""Waiting on Ray actors with a deadline, naming whoever did not answer."""

from __future__ import annotations

import time
from typing import Any


class RemoteTimeoutError(TimeoutError):
    """Raised when one or more actors did not answer in time."""


class RemoteCallError(RuntimeError):
    """Raised when an actor's call failed; the message names the actor."""


class RunStopped(RuntimeError):
    """The run cannot go on; the one-line message says what happened and why."""


def is_actor_death(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps) is Ray reporting an actor dead or unreachable."""
    while err is not None:
        name = type(err).__name__
        if name in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                    "ActorUnschedulableError"):
            return True
        err = err.__cause__
    return False


def wait_named(refs: dict[str, Any], timeout_s: float, what: str) -> dict[str, Any]:
    """``ray.get`` every reference, failing with the names of those still pending.

    ``refs`` maps a readable actor name (``rollout-1``, ``learner-0``) to an object
    reference. A dead actor raises at once, with its name, instead of hanging.
    """
    import ray

    if not refs:
        return {}
    deadline = time.monotonic() + timeout_s
    name_of = {ref: name for name, ref in refs.items()}
    pending = list(refs.values())
    results: dict[str, Any] = {}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(sorted(name_of[r] for r in pending))
            raise RemoteTimeoutError(
                f"timed out after {timeout_s:.0f}s waiting for {names} to {what}")
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        for ref in ready:
            name = name_of[ref]
            try:
                results[name] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - re-raised with the actor's name
                raise RemoteCallError(f"{name} failed to {what}: {err}") from err
    return results
