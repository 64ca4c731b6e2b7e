"""Waiting on Ray actors with a deadline, naming whoever did not answer."""

from __future__ import annotations

import time
from collections.abc import Callable
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


def is_unreachable(err: BaseException) -> bool:
    """Whether Ray could not reach the actor (``ActorUnavailableError``), rather than saw it die.

    A lost node shows up this way first: its processes' connections drop at once, while
    Ray declares the node (and its actors) dead only after its health checks fail.
    """
    while err is not None:
        if type(err).__name__ == "ActorUnavailableError":
            return True
        err = err.__cause__
    return False


def died_with_node(err: BaseException) -> bool:
    """Whether Ray reports the actor dead because its node died."""
    while err is not None:
        if type(err).__name__ in ("ActorDiedError", "RayActorError") and (
                getattr(err, "preempted", False) or "node has died" in str(err)
                or "node was terminated" in str(err)):
            return True
        err = err.__cause__
    return False


def wait_named(refs: dict[str, Any], timeout_s: float, what: str,
               tick: Callable[[list], object] | None = None) -> dict[str, Any]:
    """``ray.get`` every reference, failing with the names of those still pending.

    ``refs`` maps a readable actor name (``rollout-1``, ``learner-0``) to an object
    reference. A dead actor raises at once, with its name, instead of hanging.
    ``tick(pending)``, when given, is what waits instead of ``ray.wait``: it must return
    soon, at the latest when one of ``pending`` is ready (a rollout pool's ``poll`` with
    ``extra=pending``), so that the caller's other work moves meanwhile.
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
        if tick is None:
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        else:
            tick(pending)
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in ready:
            name = name_of[ref]
            try:
                results[name] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - re-raised with the actor's name
                raise RemoteCallError(f"{name} failed to {what}: {err}") from err
    return results
