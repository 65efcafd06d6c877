"""The GPU check: what a lent GPU machine runs, in one command and about eight minutes.

    make gpu-check                          # python -m bench.gpu_check: on CUDA, results in outputs/gpu_check/
    python -m bench.gpu_check --dry         # anywhere, in a minute or two: the same script on the tiny config

It runs, each as a subprocess, and gathers into one JSON (``gpu_check.json`` in ``--output_dir``):

1. ``tests``: the tests that need CUDA (``pytest -m cuda``);
2. ``seed_recipe``: the seed's recipe, ``train.py --config configs/mnist.yaml`` (5 epochs), with its wall
   time, its epochs' seconds and its last judge evaluation;
3. ``benchmark``: ``bench.benchmark``, our training step against the diffusers peer (the ratio, when
   diffusers is installed: ``pip install -e .[bench]``) and sampling throughput.

A part that fails is recorded with the tail of its output and the others still run; the exit status is 1
when any failed. ``--dry`` runs on the CPU with the tiny config (one epoch of 256 images) and a quick
benchmark without the peer, so that CI runs this script and it cannot break unseen between GPU loans.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from runtime.errors import UserError, run_cli
from runtime.files import atomic_write
from runtime.flags import CliParser

ROOT = Path(__file__).resolve().parent.parent
TAIL_LINES = 8


def parse_args(argv: list[str]):
    p = CliParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="on the CPU, tiny and quick: checks the script itself")
    p.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "gpu_check")
    args = p.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        raise UserError("no CUDA device here; run it on a GPU machine, or --dry to check the script on a CPU")
    return args


def run_part(cmd: list[str]) -> dict:
    """Run one part; its command, wall seconds, exit status and, when it failed, its output's tail."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    result = {"command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - start, 1), "ok": not done.returncode}
    if done.returncode:
        result["tail"] = (done.stdout + done.stderr).strip().splitlines()[-TAIL_LINES:]
    return result


def tests_part(args) -> dict:
    result = run_part([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"])
    result["ok"] = result["ok"] or result.get("tail", [""])[-1].startswith("no tests ran")
    return result


def seed_recipe_part(args) -> dict:
    out = args.output_dir / "seed_recipe"
    recipe = ["--config", "configs/tiny.yaml", "--train_subset", "256", "--num_epochs", "1", "--eval_every", "0"]
    if not args.dry:
        recipe = ["--config", "configs/mnist.yaml", "--device", "cuda"]
    result = run_part([sys.executable, "train.py", *recipe, "--output_dir", str(out), "--overwrite"])
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    result["epoch_seconds"] = [round(r["epoch_seconds"], 1) for r in records if "epoch_seconds" in r]
    evaluations = [r for r in records if "eval_accuracy" in r]
    if evaluations:
        result["last_evaluation"] = evaluations[-1]
    return result


def benchmark_part(args) -> dict:
    out = args.output_dir / "benchmark.json"
    flags = ["--device", "cuda"]
    if args.dry:
        flags = ["--device", "cpu", "--skip", "peer,epoch", "--batch_size", "8", "--repeats", "1", "--warmup", "1"]
        flags += ["--sample_images", "2", "--sample_steps", "2"]
    result = run_part([sys.executable, "-m", "bench.benchmark", *flags, "--json", str(out)])
    if out.exists():
        result["results"] = json.loads(out.read_text())
    return result


PARTS = {"tests": tests_part, "seed_recipe": seed_recipe_part, "benchmark": benchmark_part}


def main() -> None:
    args = parse_args(sys.argv[1:])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu (dry)" if args.dry else torch.cuda.get_device_name()
    report: dict = {"device": device, "torch": torch.__version__, "dry": args.dry}
    start = time.perf_counter()
    for name, part in PARTS.items():
        report[name] = part(args)
        print(f"{name}: {'ok' if report[name]['ok'] else 'FAILED'} in {report[name]['seconds']:.0f} s", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = args.output_dir / "gpu_check.json"
    atomic_write(out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    print(f"wrote {out} ({report['seconds']:.0f} s on {device})")
    if not all(report[name]["ok"] for name in PARTS):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
