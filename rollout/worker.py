"""RolloutWorker: a Ray actor that owns one vLLM engine and keeps it generating.

The actor is thin. One engine thread drives vLLM's step loop; the actor's methods, served
on other threads, only queue work and read results:

- ``submit`` queues GRPO groups; the engine thread adds one request per sample;
- ``poll`` returns the groups that finished since the last poll, waiting up to a timeout:
  it is also the worker's heartbeat, answered even while the engine is busy;
- a weight update parks the engine thread between two steps: ``load_weights`` (the object
  store) reloads the weights in place; ``begin_weight_update`` ... ``end_weight_update``
  frame a broadcast, which the learner drives through vLLM's weight-transfer calls. With
  ``partial=True`` the samples still generating are interrupted and continue under the
  new weights (their tokens so far become part of the prompt); otherwise they finish under
  the old weights first, and no new one starts until the new weights are in.

The bookkeeping of groups and segments is ``rollout.sample_book.SampleBook``.

With ``rollout.max_turns > 0`` a response may call a tool: where the model closes a code
block, the engine thread aborts that request and hands the code to a ``ToolPool``; the
pool's thread, when the call ends, appends the observation and queues the sample's next
segment in the inbox, as a weight update's continuations are. The engine thread never
waits on a tool, and keeps stepping the other requests meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from conf.schema import ModelConfig, RolloutConfig, ToolConfig
from rollout.multi_turn import Markers, MultiTurn, ToolWaitClock
from rollout.sample_book import PendingCall, SampleBook, SampleProgress
from rollout.types import GroupRequest, GroupResult, WorkerReport

WORKER_EXTENSION = "rollout.weight_receiver.RolloutWeightReceiver"


def engine_env(cfg: RolloutConfig) -> dict[str, str]:
    """Environment a rollout worker process needs before vLLM is imported."""
    return {
        # The engine core runs inside the actor's own process: collective_rpc becomes a
        # direct call and weight tensors pass without serialisation.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM's per-engine INFO lines would bury the driver's own progress.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


class RolloutWorker:
    """Wraps one vLLM engine. Created as a threaded Ray actor by the driver's rollout pool."""

    def __init__(self, worker_index: int, model_path: str, model_cfg: ModelConfig,
                 rollout_cfg: RolloutConfig, seed: int, tool_cfg: ToolConfig | None = None) -> None:
        os.environ.update(engine_env(rollout_cfg))
        from vllm import LLM

        self.worker_index = worker_index
        self.weight_version = 0
        self.cfg = rollout_cfg
        self.llm = LLM(
            model=model_path,
            dtype=model_cfg.dtype,
            seed=seed + worker_index,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            max_model_len=rollout_cfg.max_model_len,
            max_num_seqs=rollout_cfg.max_num_seqs,
            max_logprobs=max(20, rollout_cfg.top_logprobs),  # vLLM refuses more than this
            enforce_eager=rollout_cfg.enforce_eager,
            # Log-probs after temperature, i.e. of the distribution actually sampled from,
            # which is what the learner's importance ratios are measured against.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            **_weight_transfer_kwargs(rollout_cfg),
        )
        self.engine = self.llm.llm_engine
        tokenizer = self.llm.get_tokenizer()
        self.tools = None
        multi_turn = None
        if rollout_cfg.max_turns > 0:
            from rollout.tools import ToolPool

            tool_cfg = tool_cfg or ToolConfig()
            self.tools = ToolPool(tool_cfg)
            multi_turn = MultiTurn(
                rollout_cfg.max_turns,
                Markers(tool_cfg.code_start, tool_cfg.code_end, tool_cfg.output_start, tool_cfg.output_end),
                encode=lambda text: tokenizer.encode(text, add_special_tokens=False))
        self.book = SampleBook(worker_index,
                               decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                               multi_turn=multi_turn)
        # Everything below is guarded by _cv; only the engine thread touches the engine,
        # except while it is parked (_paused) for a weight update.
        self._cv = threading.Condition()
        self._inbox: list[SampleProgress] = []  # samples waiting for their next engine request
        self._busy = False  # the engine has unfinished requests
        self._pause_requests = 0
        self._paused = False
        self._draining = False  # finishing the running requests; none may start
        self._update_open = False  # parked for a weight update
        self._transfer_calls = 0  # vLLM weight-transfer calls running on actor threads
        self._stopping = False
        self._busy_s = 0.0
        self._tool_calls_running = 0  # handed to the tool pool, observation not yet back
        self._tool_clock = ToolWaitClock()
        self._error: BaseException | None = None
        self._continuations: list[SampleProgress] = []
        self._thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self._thread.start()

    def ready(self) -> dict:
        import ray

        return {"index": self.worker_index, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id()}

    # -- the driver's side -------------------------------------------------------------
    def submit(self, groups: list[GroupRequest]) -> int:
        with self._cv:
            for group in groups:
                self._inbox.extend(self.book.add_group(group))
            self._cv.notify_all()
            return self.book.in_flight_samples

    def poll(self, timeout_s: float) -> WorkerReport:
        """Groups finished since the last poll; waits up to ``timeout_s`` for one."""
        with self._cv:
            self._cv.wait_for(lambda: self.book.finished or self._error is not None, timeout_s)
            if self._error is not None:
                raise RuntimeError(f"rollout-{self.worker_index}: engine loop failed: "
                                   f"{self._error!r}") from self._error
            finished, self.book.finished = self.book.finished, []
            self._observe_tools()  # the totals up to now, a wait still running included
            return WorkerReport(worker_index=self.worker_index, weight_version=self.weight_version,
                                finished=finished, in_flight_samples=self.book.in_flight_samples,
                                busy_s=self._busy_s, interrupted_samples=self.book.interrupted,
                                tool_calls=self.book.tool_calls_done,
                                tool_wait_s=self._tool_clock.wait_s,
                                tool_idle_s=self._tool_clock.idle_s)

    def abort_all(self) -> int:
        """Drop every group (the driver no longer wants them); returns how many samples."""
        # Under the lock too: poll() hands the book's finished groups over under it, and
        # the engine thread is parked but the actor's other threads are not.
        with self._parked(), self._cv:
            dropped = self.book.in_flight_samples
            running = self.book.drop_all()
            self._inbox.clear()
            if running:
                self.engine.abort_request(running)
            return dropped

    def load_weights(self, named_tensors: list[tuple[str, Any]], version: int,
                     partial: bool = False) -> int:
        """CPU path: reload the engine's weights in place from tensors in the object store."""
        with self._weight_update(version, partial):
            self.llm.collective_rpc("load_named_tensors", args=(named_tensors,))
        return version

    def begin_weight_update(self, partial: bool = False) -> None:
        """Broadcast: park the engine before the learner opens a group or sends weights.
        An update that a failure left open is abandoned first."""
        if self._update_open:
            self.abandon_weight_update()
        self._enter_update(partial)

    def end_weight_update(self, version: int) -> int:
        """Broadcast: the weights are in; record their version and resume."""
        self._leave_update(version)
        return version

    def abandon_weight_update(self) -> None:
        """Leave an update that a lost peer left half done: wait for the transfer calls
        still running (closing the group on the learner's side ends them), let vLLM put
        the old weights back where nothing new arrived, close this end of the group, and
        resume under the version held before. The next push re-forms the group and sends
        every weight again."""
        with self._cv:
            self._cv.wait_for(lambda: self._transfer_calls == 0, timeout=self.cfg.timeout_s)
        self.llm.collective_rpc("abandon_weight_update")
        if self._update_open:
            self._leave_update(self.weight_version)

    def weights_checksum(self) -> float:
        """Sum of |w| over the engine's parameters, to observe that a sync arrived."""
        with self._parked():
            return float(self.llm.collective_rpc("weights_checksum")[0])

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        if self.tools is not None:
            self.tools.shutdown(wait=False)

    # -- the engine thread -------------------------------------------------------------
    def _engine_loop(self) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._stopping or self._pause_requests
                                      or (self._inbox and not self._draining) or self._busy)
                    if self._stopping:
                        return
                    if self._pause_requests:
                        self._paused = True
                        self._cv.notify_all()
                        self._cv.wait_for(lambda: self._stopping or not self._pause_requests)
                        self._paused = False
                        continue
                    inbox = []
                    if not self._draining:
                        # Tagged with the version the engine holds as it takes them on.
                        inbox = [self.book.start(s, self.weight_version) for s in self._inbox]
                        self._inbox = []
                        # Busy from now: a weight update that sees the engine idle must
                        # not miss requests taken but not yet added.
                        self._busy = self._busy or bool(inbox)
                        self._observe_tools()
                for request in inbox:
                    self.engine.add_request(
                        request.request_id, {"prompt_token_ids": request.prompt_token_ids},
                        SamplingParams(n=1, temperature=request.temperature, top_p=request.top_p,
                                       max_tokens=request.max_tokens, seed=request.seed,
                                       # The sampled token's own log-prob, and the top K when asked,
                                       # in flat lists rather than a dict of objects per position.
                                       logprobs=self.cfg.top_logprobs, flat_logprobs=True,
                                       # With top K, vLLM would spell out every listed token;
                                       # the response is decoded once at the end instead.
                                       detokenize=self.cfg.top_logprobs == 0,
                                       # Each step hands over only the tokens it produced,
                                       # so reading outputs does not grow with the answer.
                                       output_kind=RequestOutputKind.DELTA))
                started = time.perf_counter()
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                elapsed = time.perf_counter() - started
                with self._cv:
                    self._busy_s += elapsed
                    for output in outputs:
                        done = record_delta(self.book, output,
                                            detokenized=self.cfg.top_logprobs == 0)
                        if done is not None:
                            self.book.finished.append(done)
                    calls = self.book.take_calls()
                    if calls:
                        self.engine.abort_request([call.request_id for call in calls])
                    self._busy = self.engine.has_unfinished_requests()
                    self._tool_calls_running += len(calls)
                    self._observe_tools()
                    self._cv.notify_all()
                for call in calls:
                    self._call_tool(call)
        except BaseException as err:  # noqa: BLE001 - reported to the driver by poll()
            with self._cv:
                self._error = err
                self._cv.notify_all()

    def _call_tool(self, call: PendingCall) -> None:
        future = self.tools.submit(call.code, self.tools.cfg.name)
        future.add_done_callback(lambda f: self._on_tool_result(call, f))

    def _on_tool_result(self, call: PendingCall, future) -> None:
        """On the tool pool's thread: the observation joins the response, and the sample
        continues (through the inbox) or finishes."""
        from rollout.tools import ToolStatus

        try:
            result = future.result()
            observation, status, exec_s = result.observation, result.status.value, result.wall_s
        except BaseException as err:  # noqa: BLE001 - cancelled at stop(), or the pool broke
            observation, status, exec_s = f"[tool error: {type(err).__name__}]", ToolStatus.FAILED.value, 0.0
        with self._cv:
            self._tool_calls_running -= 1
            self._observe_tools()
            if self._stopping:
                return
            outcome = self.book.add_observation(call.sample, observation, status, exec_s)
            if isinstance(outcome, SampleProgress):
                self._inbox.append(outcome)
            elif outcome is not None:
                self.book.finished.append(outcome)
            self._cv.notify_all()

    def _observe_tools(self) -> None:
        """Under ``_cv``, after the engine's requests or the running tool calls changed."""
        if self.tools is not None:
            self._tool_clock.observe(time.perf_counter(), self._tool_calls_running, self._busy)

    # -- parking the engine --------------------------------------------------------------
    def _park(self) -> None:
        """Have the engine thread wait between two steps; the caller may then use the engine."""
        with self._cv:
            self._pause_requests += 1
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._paused or self._error is not None or self._stopping)

    def _unpark(self) -> None:
        with self._cv:
            self._pause_requests -= 1
            self._cv.notify_all()

    @contextmanager
    def _parked(self) -> Iterator[None]:
        self._park()
        try:
            yield
        finally:
            self._unpark()

    def _enter_update(self, partial: bool) -> None:
        if not partial:
            # Finish what runs under the old weights, and start nothing meanwhile: no
            # request may begin between "drained" and "loaded".
            with self._cv:
                self._draining = True
                self._cv.wait_for(lambda: not self._busy or self._error is not None)
        self._park()
        with self._cv:
            self._update_open = True
            if partial:
                self._continuations, to_abort = self.book.interrupt_all()
                if to_abort:
                    self.engine.abort_request(to_abort)

    def _leave_update(self, version: int) -> None:
        # Cached prefixes were computed with the old weights. vLLM declines the reset
        # while any request holds cache blocks; the engine is drained or its requests
        # aborted here, so a refusal means the old weights' prefixes would be reused.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"rollout-{self.worker_index}: vLLM refused to reset its prefix "
                               "cache after a weight update, so cached prefixes of the old "
                               "weights would be reused")
        with self._cv:
            self.weight_version = version
            self._inbox.extend(self._continuations)
            self._continuations = []
            self._update_open = self._draining = False
        self._unpark()

    @contextmanager
    def _weight_update(self, version: int, partial: bool) -> Iterator[None]:
        self._enter_update(partial)
        try:
            yield
        finally:
            self._leave_update(version)

    # -- broadcast: vLLM's weight-transfer calls, driven by learner rank 0 through a Ray
    # client while the engine is parked (begin_weight_update ... end_weight_update).
    def init_weight_transfer_engine(self, request: dict) -> None:
        with self._transfer_call():
            self.llm.init_weight_transfer_engine(request)

    def shutdown_weight_transfer_engine(self) -> None:
        with self._transfer_call():
            self.llm.shutdown_weight_transfer_engine()

    def start_weight_update(self) -> None:
        with self._transfer_call():
            self.llm.start_weight_update()

    def update_weights(self, request: dict) -> None:
        with self._transfer_call():
            self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        with self._transfer_call():
            self.llm.finish_weight_update()

    @contextmanager
    def _transfer_call(self) -> Iterator[None]:
        if not self._update_open:
            raise RuntimeError(f"rollout-{self.worker_index}: a weight-transfer call arrived while "
                               "the engine was not parked for an update")
        with self._cv:
            self._transfer_calls += 1
        try:
            yield
        finally:
            with self._cv:
                self._transfer_calls -= 1
                self._cv.notify_all()


TopLogprobs = tuple[list[list[int]], list[list[float]]]  # per position: token ids, log-probs


def record_delta(book: SampleBook, output, detokenized: bool) -> GroupResult | None:
    """Hand one request's DELTA output, what it generated since its previous output, to the
    book; returns the request's group if that is now done.

    ``detokenized``: the request asked vLLM for text, which then comes in pieces as well.
    """
    completion = output.outputs[0]
    logprobs, top = read_flat_logprobs(completion.logprobs)
    reason = (completion.finish_reason or "length") if output.finished else None
    return book.on_output(output.request_id, completion.token_ids, logprobs, reason,
                          completion.text if detokenized else None, top)


def read_flat_logprobs(flat) -> tuple[list[float], TopLogprobs]:
    """The sampled tokens' log-probs, and the top K at each position, from vLLM's flat lists.

    ``flat`` covers the positions of one DELTA output, the new ones only: vLLM slices them
    off the request's whole history and re-indexes them from 0. At each position vLLM lists
    the sampled token first, then the K most likely in rank order (the sampled one again if
    it is among them).
    """
    if flat is None:
        return [], ([], [])
    sampled, top_ids, top_logprobs = [], [], []
    for start, end in zip(flat.start_indices, flat.end_indices, strict=True):
        sampled.append(flat.logprobs[start])
        if end - start > 1:
            top_ids.append(flat.token_ids[start + 1:end])
            top_logprobs.append(flat.logprobs[start + 1:end])
    return sampled, (top_ids, top_logprobs)


def _weight_transfer_kwargs(cfg: RolloutConfig) -> dict:
    """Open vLLM's weight-transfer endpoint when weights arrive by broadcast
    (``cfg.weight_sync`` as ``conf.validate.resolve_auto`` leaves it)."""
    if cfg.weight_sync != "broadcast":
        return {}
    from vllm.config.weight_transfer import WeightTransferConfig

    from conf.validate import broadcast_wire
    from rollout import gloo_transfer

    # Also the package's vllm.general_plugins entry point; registered here too, so that a
    # source checkout that was never installed finds it in the engine's own process.
    gloo_transfer.register()
    return {"weight_transfer_config": WeightTransferConfig(backend=broadcast_wire(cfg))}
