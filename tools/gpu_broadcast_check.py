"""The learner side of the weight broadcast on real DeepSpeed and a real process group, as JSON.

    python tools/gpu_broadcast_check.py [--json out.json]          # GPU: NCCL, Qwen3-0.6B shape
    python tools/gpu_broadcast_check.py --device cpu --layers 2 --hidden 64 --heads 2 \\
        --kv-heads 1 --head-dim 32 --intermediate 128 --vocab 512 --bucket-mb 0.02 --learners 2

No vLLM: ``--learners`` DeepSpeed ranks (ZeRO-3 by default, NCCL on GPUs, gloo on CPU) hold
a randomly initialised Qwen3 (or ``--arch qwen2``) model with tied embeddings, by default of
Qwen3-0.6B's published shape (28 layers, hidden 1024, vocabulary 151,936: 1.19 GB in bf16,
1.50 GB on the wire with ``lm_head.weight``), sent in 256 MiB buckets. Learner rank
0 sends it with ``learner.weight_broadcast.broadcast_weights`` (``LayerwiseParameters``:
one decoder layer gathered at a time; every learner rank joins the gathers) into a process
group of its own with ``--receivers`` plain torch processes, which cut the buckets with
``rollout.weight_wire.receive_buckets`` from the ``update_info`` the sender published. Each
receiver checks every tensor: the names are the model's every parameter name in order
(``lm_head.weight`` included), dtype, shape, and bits equal to the weights the learners
loaded; ``lm_head.weight`` equal to the embedding. All processes are spawned here with TCP
rendezvous on 127.0.0.1.

Devices: learner i on GPU i, receiver j on GPU (learners + j) mod the GPU count. When a
receiver shares a GPU with the sender, plain NCCL refuses the group ("Duplicate GPU
detected"); ``--wire auto`` then tries, each in throw-away processes: ``nccl`` (to see the
refusal), ``nccl-hostid`` (a distinct ``NCCL_HOSTID`` per process, so NCCL treats them as
two hosts and sends over its socket transport on ``lo``: a real NCCL broadcast, at socket
speed), and last ``gloo`` (CUDA tensors over gloo; packing and unpacking still on the GPU).
The report says which one ran and why.

``--rounds`` broadcasts as lpreg sends them ("async": the host does not wait for a bucket's
broadcast before packing the next), then one "lockstep" round whose broadcast function
synchronises the device after each bucket. Peak GPU memory per learner and round
(``max_memory_allocated`` above what was allocated before the round) must stay, in lockstep,
within the largest layer group + two of the largest bucket + 64 MiB, and, async, under the
model + a bucket (what a whole-model gather would add). ZeRO-3 partitions the parameters
even at one rank (the report counts them), but there a gather is a view of the rank's own
partition: at one rank the memory measured is the buckets in flight.
Exit status 0 on PASS.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
WIRES = ("auto", "nccl", "nccl-hostid", "gloo")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("model shape (default: Qwen3-0.6B's)")
    shape.add_argument("--arch", default="qwen3", choices=["qwen3", "qwen2"])
    shape.add_argument("--layers", type=int, default=28)
    shape.add_argument("--hidden", type=int, default=1024)
    shape.add_argument("--heads", type=int, default=16)
    shape.add_argument("--kv-heads", type=int, default=8)
    shape.add_argument("--head-dim", type=int, default=128, help="qwen3 only")
    shape.add_argument("--intermediate", type=int, default=3072)
    shape.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--bucket-mb", type=float, default=256.0, help="MiB per bucket")
    parser.add_argument("--learners", type=int, default=1)
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=3, choices=[0, 3])
    parser.add_argument("--rounds", type=int, default=2,
                        help="async broadcasts of the whole model, then one lockstep")
    parser.add_argument("--wire", default="auto", choices=WIRES)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the main run")
    parser.add_argument("--probe-timeout", type=float, default=90.0)
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser.parse_args(argv)


# -- the processes ---------------------------------------------------------------------------
def _set_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _wire_env(mode: str, host_id: str) -> None:
    """Before any NCCL call: in ``nccl-hostid`` mode each sharing process claims its own
    host, so NCCL's duplicate-GPU check passes and it picks its network transport."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if mode == "nccl-hostid":
        os.environ.update({"NCCL_HOSTID": host_id, "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1",
                           "NCCL_NVLS_ENABLE": "0", "NCCL_MNNVL_ENABLE": "0"})


def _open_wire(mode: str, port: int, rank: int, size: int, timeout_s: float):
    """A process group of its own (learner rank 0 and the receivers), outside the learners'
    default group, as an engine's weight-transfer group is. Returns (store, broadcast)."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=timeout)
    prefix = dist.PrefixStore("lpreg-wire", store)
    if mode == "gloo":
        group = dist.ProcessGroupGloo(prefix, rank, size, timeout)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefix, rank, size, options)
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0

    def broadcast(tensor: torch.Tensor) -> None:
        group.broadcast([tensor], opts).wait()

    broadcast.group = group  # kept alive with the function
    return store, broadcast


def _warm_up(broadcast, device: str, sender: bool) -> bool:
    """One small broadcast: opens a lazily created NCCL communicator and lines the ranks up."""
    expected = torch.arange(1 << 18, dtype=torch.int32)
    tensor = expected.to(device) if sender else torch.zeros_like(expected, device=device)
    broadcast(tensor)
    _sync(device)
    return torch.equal(tensor.cpu(), expected)


def _write(spec: dict, role: str, result: dict) -> None:
    Path(spec["out"], f"{role}.json").write_text(json.dumps(result))


def _probe(index: int, spec: dict) -> None:
    device = spec["wire_devices"][index]
    os.environ.setdefault("NCCL_DEBUG", "WARN")  # the reason for a refusal
    _wire_env(spec["mode"], f"lpreg-wire-{index}")
    _set_device(device)
    try:
        _, broadcast = _open_wire(spec["mode"], spec["wire_port"], index, len(spec["wire_devices"]),
                                  spec["timeout"])
        ok = _warm_up(broadcast, device, index == 0)
        _write(spec, f"probe{index}", {"ok": ok})
    except Exception:
        _write(spec, f"probe{index}", {"ok": False, "error": traceback.format_exc(limit=2)[-1500:]})
        raise
    os._exit(0)  # skips the groups' teardown, which can hang; the results are written


def _worker(index: int, spec: dict) -> None:
    learners = len(spec["learner_devices"])
    role = f"learner{index}" if index < learners else f"receiver{index - learners}"
    try:
        result = _learner(index, spec) if index < learners else _receiver(index - learners, spec)
    except Exception:
        _write(spec, role, {"error": traceback.format_exc()[-3000:]})
        raise
    _write(spec, role, result)
    os._exit(0)  # every collective is done; skips the groups' teardown, which can hang


def _learner(rank: int, spec: dict) -> dict:
    device = spec["learner_devices"][rank]
    _wire_env(spec["mode"], "lpreg-learners")
    _set_device(device)
    on_gpu = device.startswith("cuda")
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(len(spec["learner_devices"])),
        "LOCAL_RANK": str(torch.device(device).index or 0) if on_gpu else "0",
        "LOCAL_WORLD_SIZE": str(len(spec["learner_devices"])),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(spec["learner_port"])})
    broadcast = store = None
    if rank == 0:  # the wire first: the receivers wait on it while the engine is built
        store, broadcast = _open_wire(spec["mode"], spec["wire_port"], 0,
                                      1 + len(spec["receiver_devices"]), spec["timeout"])

    import deepspeed
    from transformers import AutoModelForCausalLM

    from conf.schema import LearnerConfig
    from learner.actor import _dtype_kwarg, deepspeed_config
    from learner.weight_broadcast import LayerwiseParameters, broadcast_weights, layer_groups
    from rollout.weight_wire import bucket_ranges, update_info

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=spec["timeout"]))
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **_dtype_kwarg(dtype)).to(device)
    model.config.use_cache = False
    cfg = LearnerConfig(num_workers=len(spec["learner_devices"]), zero_stage=spec["zero_stage"],
                        micro_batch_size=1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-6),
                                      config=deepspeed_config(cfg, spec["dtype"]))
    module = engine.module
    zero3 = spec["zero_stage"] == 3
    source = LayerwiseParameters(module, zero3)
    metas = source.metadata()
    unique = list({id(p): p for p in source.params.values()}.values())

    def partitioned() -> int:
        return sum(str(getattr(p, "ds_status", "")).endswith("NOT_AVAILABLE") for p in unique)

    sizes = {m.name: m.nbytes for m in metas}
    by_id = {name: id(p) for name, p in source.params.items()}
    groups = [sum({by_id[n]: sizes[n] for n in group}.values()) for group in layer_groups(list(sizes))]
    buckets = [sum(metas[i].nbytes for i in r)
               for r in bucket_ranges(list(sizes.values()), spec["bucket_bytes"])]
    result = {
        "rank": rank, "device": device, "tensors": len(metas), "unique_parameters": len(unique),
        "tied": module.get_output_embeddings().weight is module.get_input_embeddings().weight,
        "partitioned_before": partitioned() if zero3 else None,
        "resident_partition_bytes": (sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in unique)
                                     if zero3 else None),
        "model_bytes": sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) * p.element_size()
                           for p in unique),
        "wire_bytes": sum(sizes.values()), "layer_groups": len(groups),
        "largest_group_bytes": max(groups), "buckets": len(buckets), "largest_bucket_bytes": max(buckets),
    }
    if rank == 0:
        store.set("update_info", json.dumps(update_info(metas)))
        result["warm_up_ok"] = _warm_up(broadcast, device, True)
    def lockstep(tensor: torch.Tensor) -> None:
        broadcast(tensor)
        _sync(device)  # the host waits for each bucket: one in flight at a time

    rounds = []
    for kind in ["async"] * spec["rounds"] + ["lockstep"]:
        _sync(device)
        if on_gpu:
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        send = None if broadcast is None else broadcast if kind == "async" else lockstep
        count, nbytes = broadcast_weights(LayerwiseParameters(module, zero3), spec["bucket_bytes"],
                                          send, device)
        _sync(device)
        rounds.append({"kind": kind, "seconds": time.perf_counter() - start, "tensors": count,
                       "bytes": nbytes})
        if on_gpu:
            rounds[-1].update(baseline_bytes=baseline,
                              peak_extra_bytes=torch.cuda.max_memory_allocated() - baseline)
    result["rounds"] = rounds
    result["partitioned_after"] = partitioned() if zero3 else None
    return result


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.to(a.device)
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                            b.contiguous().view(-1).view(torch.uint8)))


def _receiver(index: int, spec: dict) -> dict:
    from safetensors.torch import load_file

    from rollout.weight_wire import metas_from_update_info, receive_buckets

    device = spec["receiver_devices"][index]
    _wire_env(spec["mode"], f"lpreg-receiver-{index}")
    _set_device(device)
    store, broadcast = _open_wire(spec["mode"], spec["wire_port"], 1 + index,
                                  1 + len(spec["receiver_devices"]), spec["timeout"])
    reference: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(spec["model_dir"], "*.safetensors"))):
        reference.update(load_file(path))
    info = json.loads(store.get("update_info"))
    metas = metas_from_update_info(info["names"], info["dtype_names"], info["shapes"])
    result = {"device": device, "names_as_model": info["names"] == spec["names"],
              "warm_up_ok": _warm_up(broadcast, device, False), "rounds": []}
    for _ in range(spec["rounds"] + 1):  # and the sender's lockstep round
        _sync(device)
        start = time.perf_counter()
        buckets = list(receive_buckets(metas, spec["bucket_bytes"], broadcast, device))
        _sync(device)
        seconds = time.perf_counter() - start
        received = [pair for bucket in buckets for pair in bucket]
        got = dict(received)
        bad = [name for name, tensor in received
               if name in reference and not _same_bits(tensor, reference[name])]
        bad += [f"{m.name} is {got[m.name].dtype} {tuple(got[m.name].shape)}" for m in metas
                if m.name in got and (got[m.name].dtype != m.dtype or tuple(got[m.name].shape) != m.shape)]
        result["rounds"].append({
            "seconds": seconds, "buckets": len(buckets),
            "bytes": sum(t.numel() * t.element_size() for _, t in received),
            "order_ok": [name for name, _ in received] == [m.name for m in metas],
            "tensors": len(received), "mismatched": bad[:5], "mismatches": len(bad),
            "unknown": [name for name in got if name not in reference and name != HEAD][:5],
            "missing": [name for name in reference if name not in got][:5],
            "lm_head_received": HEAD in got,
            "lm_head_equals_embedding": HEAD in got and EMBED in got and _same_bits(got[HEAD], got[EMBED]),
        })
        del buckets, received, got
    return result


# -- the parent ------------------------------------------------------------------------------
def _spawn(fn, spec: dict, nprocs: int, timeout: float) -> str | None:
    """Run ``fn(i, spec)`` in ``nprocs`` spawned processes; the failure, or None."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=(spec,), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                for process in context.processes:
                    process.join(10)
                return f"timed out after {timeout:.0f} s"
    except Exception as error:  # noqa: BLE001 - a child's failure, reported
        return f"{type(error).__name__}: {str(error)[-1500:]}"
    return None


def _results(out: str) -> dict[str, dict]:
    return {Path(p).stem: json.loads(Path(p).read_text()) for p in glob.glob(os.path.join(out, "*.json"))}


def build_model(args: argparse.Namespace, directory: str) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
    if args.arch == "qwen3":
        model_class, config = Qwen3ForCausalLM, Qwen3Config(head_dim=args.head_dim, **common)
    else:
        model_class, config = Qwen2ForCausalLM, Qwen2Config(**common)
    torch.manual_seed(0)
    model = model_class(config).to(getattr(torch, args.dtype))
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("the model's output projection is not tied to its embedding")
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    unique = list(model.parameters())
    model.save_pretrained(directory, safe_serialization=True)
    return {"arch": args.arch, "names": names, "parameters": sum(p.numel() for p in unique),
            "bytes": sum(p.numel() * p.element_size() for p in unique)}


def plan_devices(gpus: int, learners: int, receivers: int) -> tuple[list[str], list[str]]:
    """Learner i on GPU i; receiver j on GPU (learners + j) mod gpus; all on CPU without GPUs."""
    if gpus == 0:
        return ["cpu"] * learners, ["cpu"] * receivers
    if learners > gpus:
        raise SystemExit(f"{learners} learner ranks need as many GPUs; {gpus} visible")
    return ([f"cuda:{i}" for i in range(learners)],
            [f"cuda:{(learners + j) % gpus}" for j in range(receivers)])


def choose_wire(args, spec: dict, work: str) -> tuple[str, list[dict]]:
    """The wire's backend and the probes that chose it."""
    from learner.actor import free_port

    wire_devices = spec["learner_devices"][:1] + spec["receiver_devices"]
    if wire_devices[0] == "cpu":
        if args.wire not in ("auto", "gloo"):
            raise SystemExit(f"--wire {args.wire} needs GPUs")
        return "gloo", []
    if args.wire != "auto":
        return args.wire, []
    if len(set(wire_devices)) == len(wire_devices):
        return "nccl", []
    probes = []
    for mode in ("nccl", "nccl-hostid"):
        out = tempfile.mkdtemp(prefix=f"probe-{mode}-", dir=work)
        start = time.perf_counter()
        failure = _spawn(_probe, {"mode": mode, "wire_devices": wire_devices, "wire_port": free_port(),
                                  "timeout": args.probe_timeout * 0.8, "out": out},
                         len(wire_devices), args.probe_timeout)
        found = _results(out)
        ok = failure is None and len(found) == len(wire_devices) and all(r["ok"] for r in found.values())
        errors = [r["error"] for r in found.values() if "error" in r]
        probe = {"probe": mode, "ok": ok, "seconds": round(time.perf_counter() - start, 1),
                 "error": None if ok else (errors[0] if errors else failure)}
        print(json.dumps(probe), flush=True)
        probes.append(probe)
        if ok:
            return mode, probes
    return "gloo", probes


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from learner.actor import free_port

    on_gpu = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    gpus = torch.cuda.device_count() if on_gpu else 0
    learner_devices, receiver_devices = plan_devices(gpus, args.learners, args.receivers)
    work = tempfile.mkdtemp(prefix="lpreg-broadcast-check-")
    start = time.perf_counter()
    model = build_model(args, os.path.join(work, "model"))
    nccl = torch.cuda.nccl.version() if on_gpu else None
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}
    print(json.dumps({"model": {k: v for k, v in model.items() if k != "names"}, "gpus": gpus,
                      "versions": versions, "build_s": round(time.perf_counter() - start, 1)}), flush=True)

    spec = {"learner_devices": learner_devices, "receiver_devices": receiver_devices,
            "model_dir": os.path.join(work, "model"), "names": model["names"], "dtype": args.dtype,
            "zero_stage": args.zero_stage, "bucket_bytes": max(1, int(args.bucket_mb * 2**20)),
            "rounds": args.rounds, "timeout": args.timeout, "out": tempfile.mkdtemp(dir=work)}
    mode, probes = choose_wire(args, spec, work)
    spec.update(mode=mode, learner_port=free_port(), wire_port=free_port())
    start = time.perf_counter()
    failure = _spawn(_worker, spec, args.learners + args.receivers, args.timeout)
    found = _results(spec["out"])
    learners = [found.get(f"learner{i}", {}) for i in range(args.learners)]
    receivers = [found.get(f"receiver{j}", {}) for j in range(args.receivers)]
    errors = [r["error"] for r in learners + receivers if "error" in r]

    report = {"ok": False, "wire": mode, "nccl_broadcast": mode.startswith("nccl"), "probes": probes,
              "devices": {"learners": learner_devices, "receivers": receiver_devices},
              "versions": versions, "model": {k: v for k, v in model.items() if k != "names"},
              "bucket_bytes": spec["bucket_bytes"], "run_s": round(time.perf_counter() - start, 1),
              "failure": failure, "errors": errors, "checks": {}, "rounds": []}
    if failure is None and not errors and all(learners) and all(receivers):
        sender = learners[0]
        for i, sent in enumerate(sender["rounds"]):
            got = [r["rounds"][i] for r in receivers]
            seconds = max(g["seconds"] for g in got)
            report["rounds"].append({
                "round": i, "kind": sent["kind"], "bytes": sent["bytes"], "tensors": sent["tensors"],
                "buckets": got[0]["buckets"],
                "sender_s": round(sent["seconds"], 4), "receiver_s": round(seconds, 4),
                "gb_per_s": round(sent["bytes"] / seconds / 1e9, 3)})
        checks = {
            "tied_embeddings": all(r["tied"] for r in learners),
            "same_counts_on_every_learner": len({(x["tensors"], x["bytes"]) for r in learners
                                                 for x in r["rounds"]}) == 1,
            "names_are_every_parameter_name": all(r["names_as_model"] for r in receivers),
            "warm_up": sender["warm_up_ok"] and all(r["warm_up_ok"] for r in receivers),
            "bytes_received": all(g["bytes"] == s["bytes"] for r in receivers
                                  for g, s in zip(r["rounds"], sender["rounds"], strict=True)),
            "tensors_bit_equal": all(g["order_ok"] and not g["mismatches"] and not g["missing"]
                                     and not g["unknown"] and g["tensors"] == len(model["names"])
                                     for r in receivers for g in r["rounds"]),
            "lm_head_received_and_equal_to_embedding": all(
                g["lm_head_received"] and g["lm_head_equals_embedding"]
                for r in receivers for g in r["rounds"]),
        }
        if args.zero_stage == 3:
            checks["zero3_partitioned_before_and_after"] = all(
                r["partitioned_before"] == r["partitioned_after"] == r["unique_parameters"] for r in learners)
        memory = []
        for r in learners:
            if "peak_extra_bytes" not in r["rounds"][0]:
                continue  # CPU
            bound = r["largest_group_bytes"] + 2 * r["largest_bucket_bytes"] + 64 * 2**20
            whole = r["model_bytes"] + r["largest_bucket_bytes"]
            peaks = {kind: max(x["peak_extra_bytes"] for x in r["rounds"] if x["kind"] == kind)
                     for kind in ("async", "lockstep")}
            memory.append({k: r[k] for k in ("rank", "device", "model_bytes", "wire_bytes",
                                             "resident_partition_bytes", "largest_group_bytes",
                                             "largest_bucket_bytes")}
                          | {"baseline_bytes": r["rounds"][0]["baseline_bytes"],
                             "async_peak_extra_bytes": peaks["async"],
                             "lockstep_peak_extra_bytes": peaks["lockstep"],
                             "layer_plus_two_buckets_bytes": bound, "model_plus_bucket_bytes": whole,
                             "async_peak_extra_over_model_plus_bucket": round(peaks["async"] / whole, 3)})
            if args.zero_stage == 3:
                for key, ok in (("lockstep_peak_extra_within_layer_plus_two_buckets",
                                 peaks["lockstep"] <= bound),
                                ("async_peak_extra_under_model_plus_bucket", peaks["async"] < whole)):
                    checks[key] = checks.get(key, True) and ok
        report.update(checks=checks, memory=memory, learners=learners, receivers=receivers,
                      ok=all(checks.values()))
        for line in report["rounds"] + memory:
            print(json.dumps(line), flush=True)
    print(json.dumps({k: report[k] for k in ("ok", "wire", "nccl_broadcast", "checks", "failure", "errors")}),
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("gpu broadcast check:", "PASS" if report["ok"] else "FAIL")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
