"""The learner's checkpoint round trip under ZeRO-3 on real DeepSpeed (gloo), one rank.

Sharded parameters and optimizer state come back exactly, the next step lands on the
same weights, and the Hugging Face export is gathered from the shards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent


def test_zero3_checkpoint_round_trip(tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # Its own process: DeepSpeed's process group and environment stay out of pytest.
    proc = subprocess.run([sys.executable, "tools/checkpoint_smoke.py", "--stages", "3",
                           "--json", str(report)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (run,) = json.loads(report.read_text())["runs"]
    assert run["zero_stage"] == 3 and run["backend"] == "gloo"
    assert run["loaded_equals_saved"] and run["weights_moved"]
    assert run["second_step_equal"], run["second_step_max_diff"]
    assert run["export_equals_saved"] and run["tokenizer_exported"]
