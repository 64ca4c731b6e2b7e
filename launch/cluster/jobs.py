"""Ray cluster jobs: the job server behind ``lpreg submit``, ``status``, ``logs`` and ``stop``.

They talk to Ray's Jobs API, the HTTP server on the head's dashboard port (8265).
``submit`` checks the config here first, then ships the project directory as the job's
working directory and runs ``python -m launch.cli train ...`` on the head.

Ray turns on token authentication for that API by default, and its client only sends
the token when ``RAY_AUTH_MODE=token`` is set in the client's environment. lpreg looks
the token up itself, where Ray would (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``), and always sends it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conf.load import RECIPE_DIR, ConfigError, recipe_files, resolve_recipe

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROJECT_DIR = Path(__file__).resolve().parents[2]
# Left out of the upload: environments, outputs, caches, VCS data and model weights.
# Ray also honours .gitignore, but an explicit list keeps the upload small even when
# the project is not a git checkout. Ray refuses packages over 500 MiB.
UPLOAD_EXCLUDES = [
    ".venv/", "venv/", ".git/", "runs/", "/models/", ".bench/", ".gpu-wheels/",
    "__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/",
    "*.egg-info/", "tensorboard/", "*.safetensors", "*.bin", "*.pt",
]
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class JobCommandError(RuntimeError):
    """A problem talking to the job server, phrased for the user."""


# --- where the job server is ------------------------------------------------------

def default_address(environ: Mapping[str, str] | None = None) -> str:
    """RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an HTTP URL, else local 8265.

    A RAY_ADDRESS of the ``HOST:6379`` form names the GCS, not the job server, so it
    is not used here.
    """
    env = os.environ if environ is None else environ
    if env.get("RAY_API_SERVER_ADDRESS"):
        return env["RAY_API_SERVER_ADDRESS"]
    ray_address = env.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    return DEFAULT_ADDRESS


def normalize_address(address: str) -> str:
    """``HOST:8265`` -> ``http://HOST:8265``; no trailing slash."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise JobCommandError(
            f"--address {address!r}: the job server is an http(s) URL such as "
            f"{DEFAULT_ADDRESS} (the dashboard port), not a ray:// or GCS address")
    return address


# --- the token ----------------------------------------------------------------------

@dataclass(frozen=True)
class TokenLookup:
    """The token lpreg will send, where it came from, and every place it looked."""

    token: str | None
    source: str | None
    searched: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def find_auth_token(environ: Mapping[str, str] | None = None,
                    home: Path | None = None) -> TokenLookup:
    """Ray's own order: ``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``.

    When ``RAY_AUTH_TOKEN_PATH`` is set but unusable, the default file is not tried:
    the user pointed elsewhere on purpose, and sending another cluster's token would
    only turn the clear "no token" answer into a confusing "wrong token" one.
    """
    env = os.environ if environ is None else environ
    searched: list[str] = []
    value = env.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return TokenLookup(value, "RAY_AUTH_TOKEN", ["RAY_AUTH_TOKEN"])
    searched.append("RAY_AUTH_TOKEN (not set)")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = _read_token(path)
        if token:
            return TokenLookup(token, f"RAY_AUTH_TOKEN_PATH={path}", [*searched, str(path)])
        searched.append(f"RAY_AUTH_TOKEN_PATH={path} ({'empty' if path.is_file() else 'no such file'})")
        return TokenLookup(None, None, searched)
    searched.append("RAY_AUTH_TOKEN_PATH (not set)")
    path = (home if home is not None else Path.home()) / ".ray" / "auth_token"
    token = _read_token(path)
    if token:
        return TokenLookup(token, str(path), [*searched, str(path)])
    searched.append(f"{path} ({'empty' if path.is_file() else 'no such file'})")
    return TokenLookup(None, None, searched)


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _where_to_put_the_token(lookup: TokenLookup) -> str:
    return (f"lpreg looked at: {'; '.join(lookup.searched)}. Put the cluster's token (print it "
            f"on the head with `ray get-auth-token`) in RAY_AUTH_TOKEN, or in a file named by "
            f"RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token")


def missing_token_message(address: str, lookup: TokenLookup) -> str:
    """Ray's client refused to send a request at all: auth is on here and there is no token."""
    return (f"token authentication is on for this client (RAY_AUTH_MODE=token), but lpreg "
            f"found no token to send to {address}. {_where_to_put_the_token(lookup)}")


def auth_error_message(status: int, address: str, lookup: TokenLookup) -> str:
    """What to say when the job server refuses lpreg (401: no token, 403: wrong token)."""
    answer = {401: "401 Unauthorized", 403: "403 Forbidden"}.get(status, str(status))
    if lookup.token is None:
        return (
            f"the Ray job server at {address} answered {answer}: the cluster uses token "
            f"authentication and lpreg found no token to send. {_where_to_put_the_token(lookup)}")
    return (
        f"the Ray job server at {address} answered {answer}: it rejected the token lpreg "
        f"sent, taken from {lookup.source}. That token belongs to another cluster or is out "
        f"of date; use the one `ray get-auth-token` prints on this cluster's head")


# --- what the job runs --------------------------------------------------------------

def recipe_argument(recipe: str | None, project_dir: Path) -> str | None:
    """The ``-c`` value the job should see, valid inside the shipped working directory.

    A shipped recipe name stays a name. A recipe file must lie inside the project
    directory, since that is all the job receives; it is passed relative to it.
    """
    if recipe is None:
        return None
    if not Path(recipe).expanduser().is_file():
        resolve_recipe(recipe)  # raises ConfigError when it is not a shipped name either
        return recipe
    path = Path(recipe).expanduser().resolve()
    # Its bases travel too: each must be shipped, or be one of the shipped recipes.
    for base, _ in recipe_files(path)[:-1]:
        if not (base.is_relative_to(project_dir.resolve()) or base.is_relative_to(RECIPE_DIR)):
            raise ConfigError(
                f"recipe file {path} extends {base}, which is outside {project_dir.resolve()}, "
                f"the directory shipped to the cluster; move it there (or into conf/recipes/)")
    try:
        return path.relative_to(project_dir.resolve()).as_posix()
    except ValueError:
        raise ConfigError(
            f"recipe file {path} is outside {project_dir.resolve()}, the directory "
            f"shipped to the cluster; move it there (or into conf/recipes/)") from None


def train_entrypoint(recipe: str | None, overrides: Sequence[str], python: str = "python",
                     retries: int = 0) -> str:
    """The shell command the job runs.

    ``python -m launch.cli`` rather than the ``lpreg`` script: Ray puts the shipped
    working directory first on the job's PYTHONPATH, so this runs the shipped code
    with any Python that has the dependencies, even where lpreg itself was never
    installed on the cluster.
    """
    argv = [python, "-m", "launch.cli", "train"]
    if retries:
        argv += ["--retries", str(retries)]
    if recipe:
        argv += ["-c", recipe]
    argv += list(overrides)
    return shlex.join(argv)


def package_project(project_dir: Path, dest_dir: Path) -> Path:
    """Zip the project once, with Ray's own packager and selection rules.

    Given a directory, Ray's client hashes the tree twice: once for the package name
    the job will ask for, once for the upload. A file saved in between (an editor, a
    test run writing into the tree) makes the two differ, and the job fails to find
    its package. A finished zip hashes the same both times. The selection is Ray's:
    .gitignore and .rayignore, Ray's default excludes, and ``UPLOAD_EXCLUDES``.
    """
    from ray._private.ray_constants import (
        RAY_RUNTIME_ENV_IGNORE_GITIGNORE,
        get_runtime_env_default_excludes,
    )
    from ray._private.runtime_env.packaging import create_package

    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    target = dest_dir / "lpreg-project.zip"
    create_package(str(project_dir), target, include_gitignore=include_gitignore,
                   excludes=get_runtime_env_default_excludes() + UPLOAD_EXCLUDES)
    return target


def job_runtime_env(package: Path) -> dict:
    return {"working_dir": str(package)}


def relative_path_notes(cfg) -> list[str]:
    """Warnings for paths the job will resolve inside its temporary working directory."""
    notes = []
    if not Path(cfg.trainer.output_dir).is_absolute():
        notes.append(
            f"trainer.output_dir={cfg.trainer.output_dir} is relative: the run directory "
            f"will be inside the job's working directory on the head, which Ray deletes "
            f"eventually; pass an absolute path (on shared storage for multi-node clusters)")
    if cfg.model.path is None and not Path(cfg.model.cache_dir).is_absolute():
        notes.append(
            f"model.cache_dir={cfg.model.cache_dir} is relative: the job builds the tiny "
            f"model afresh in its working directory; an absolute path lets jobs reuse it")
    return notes


# --- talking to the server ----------------------------------------------------------

def make_client(address: str, headers: dict[str, str]):
    """Ray's client; it checks the connection (and so the token) as it is made."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=headers)


@dataclass
class JobServer:
    """A ``JobSubmissionClient`` with the token attached and errors made readable."""

    address: str
    lookup: TokenLookup
    _client: object | None = None

    @property
    def client(self):
        if self._client is None:
            with self.translating_errors():
                self._client = make_client(self.address, self.lookup.headers())
        return self._client

    @contextmanager
    def translating_errors(self, job_id: str | None = None) -> Iterator[None]:
        """Turn the client's exceptions into one-line ``JobCommandError`` messages."""
        try:
            yield
        except JobCommandError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes one clear line
            raise JobCommandError(self._explain(err, job_id)) from err

    def _explain(self, err: Exception, job_id: str | None) -> str:
        import requests

        status = _http_status(err)
        if status in (401, 403):
            return auth_error_message(status, self.address, self.lookup)
        if type(err).__name__ == "AuthenticationError":
            # Raised by the client itself, before any request: no server said anything.
            return missing_token_message(self.address, self.lookup)
        text = str(err)
        if isinstance(err, ConnectionError | requests.exceptions.ConnectionError) or (
                "Failed to connect" in text):
            return (f"cannot reach a Ray job server at {self.address}: is the head running, "
                    f"with ray[default] installed, and is this its dashboard address "
                    f"(port 8265 unless --dashboard-port says otherwise)?")
        if job_id and ("404" in text or "does not exist" in text):
            return f"no job {job_id!r} on the Ray cluster at {self.address}"
        first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        return f"the Ray job server at {self.address} failed: {first_line}"

    def submit(self, entrypoint: str, project_dir: Path, submission_id: str | None) -> str:
        with self.translating_errors(), tempfile.TemporaryDirectory(prefix="lpreg-submit-") as tmp:
            package = package_project(project_dir, Path(tmp))
            print(f"shipping {project_dir} ({package.stat().st_size / 1024:.0f} KiB zipped)",
                  file=sys.stderr)
            return self.client.submit_job(entrypoint=entrypoint,
                                          runtime_env=job_runtime_env(package),
                                          submission_id=submission_id)

    def status(self, job_id: str) -> tuple[str, str]:
        with self.translating_errors(job_id):
            info = self.client.get_job_info(job_id)
        return str(getattr(info.status, "value", info.status)), info.message or ""

    def logs(self, job_id: str) -> str:
        with self.translating_errors(job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, out=None) -> None:
        """Stream the job's logs until it ends."""
        out = out or sys.stdout

        async def pump() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with self.translating_errors(job_id):
            asyncio.run(pump())

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float = 60.0) -> tuple[str, str]:
        """The final state: the log stream closes at the end, the state may lag a moment."""
        deadline = time.monotonic() + timeout_s
        while True:
            state, message = self.status(job_id)
            if state in TERMINAL_STATES or time.monotonic() > deadline:
                return state, message
            time.sleep(poll_s)

    def stop(self, job_id: str) -> bool:
        with self.translating_errors(job_id):
            return bool(self.client.stop_job(job_id))


def _http_status(err: BaseException) -> int | None:
    """The HTTP status behind a client error, where it can be told."""
    for status_attr in ("status", "status_code"):
        status = getattr(err, status_attr, None)
        if isinstance(status, int):
            return status
    text = str(err)
    # Ray's client raises AuthenticationError("Authentication required: ...") for a 401
    # and ("Authentication failed: ...") for a 403. Any other AuthenticationError comes
    # from the client before it sent anything (auth is on and it has no token).
    if type(err).__name__ == "AuthenticationError":
        if text.startswith("Authentication failed"):
            return 403
        return 401 if text.startswith("Authentication required") else None
    for code in (401, 403):
        if f"status code {code}" in text or f"{code} Unauthorized" in text or f"{code} Forbidden" in text:
            return code
    return None


def open_server(address: str | None) -> JobServer:
    return JobServer(normalize_address(address or default_address()), find_auth_token())
