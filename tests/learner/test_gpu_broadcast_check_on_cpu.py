"""tools/gpu_broadcast_check.py on CPU: two ZeRO-3 learner ranks (DeepSpeed on gloo) send a
tiny tied-embedding Qwen3 model bucket by bucket to a receiver over a gloo group, which
checks every tensor bit for bit. The same script runs on GPUs with NCCL."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "tools" / "gpu_broadcast_check.py"
TINY = ["--device", "cpu", "--layers", "2", "--hidden", "64", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "32", "--intermediate", "128", "--vocab", "512", "--bucket-mb", "0.02"]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_broadcast_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_devices_share_a_gpu_only_when_there_are_too_few():
    plan = _script().plan_devices
    assert plan(0, 2, 1) == (["cpu", "cpu"], ["cpu"])
    assert plan(1, 1, 1) == (["cuda:0"], ["cuda:0"])
    assert plan(4, 2, 2) == (["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"])
    with pytest.raises(SystemExit):
        plan(1, 2, 1)


@pytest.mark.integration
def test_zero3_layerwise_broadcast_arrives_bit_equal(tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # Its own process: the script spawns the learner and receiver processes itself.
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--learners", "2", "--receivers", "1",
                           "--timeout", "240", "--json", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(report.read_text())
    assert result["ok"] and result["wire"] == "gloo" and all(result["checks"].values())
    assert result["checks"]["zero3_partitioned_before_and_after"]
    (receiver,) = result["receivers"]
    for got in receiver["rounds"]:
        assert got["buckets"] > 1 and got["lm_head_received"] and got["mismatches"] == 0
    wire = result["model"]["bytes"] + 512 * 64 * 2  # lm_head.weight travels too
    assert [(r["kind"], r["bytes"]) for r in result["rounds"]] == [("async", wire)] * 2 + [("lockstep", wire)]
