"""The GPU check (bench/gpu_check.py) in its dry mode: CI runs the script on a CPU, so that it cannot break
unseen between GPU loans. Its parts run, and its JSON holds what each part reports."""

import json
import subprocess
import sys

import pytest

from tests.helpers import PROCESS_ENV, ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_a_cpu_and_writes_its_report(tmp_path):
    cmd = [sys.executable, "-m", "bench.gpu_check", "--dry", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=PROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry"] and all(report[part]["ok"] for part in ("tests", "seed_recipe", "benchmark"))
    assert len(report["seed_recipe"]["epoch_seconds"]) == 1
    training = report["benchmark"]["results"]
    assert training["device"] == "cpu" and training["sampling"]
