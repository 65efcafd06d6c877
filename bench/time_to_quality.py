"""Time to quality: the quick-start recipe as train.py runs it, with a judge evaluation after every epoch,
printed as a curve of wall time against accuracy, Fréchet distance and shape. A benchmark, not a test.

    python -m bench.time_to_quality                                  # configs/cpu.yaml, 50 images per digit
    python -m bench.time_to_quality --config configs/cpu.yaml -- --num_epochs 6 --learning_rate 4e-3

Each epoch's evaluation samples ``--eval_samples`` images per digit from the training wordings at the
default sampling settings (the same seed every epoch) and is timed apart from training: the "train s"
column is what the quick start spends training. FMD ratio is FMD over the real-vs-real floor of the
same size (1.0 is perfect); thickness and width are the samples' median over real test digits'; specks
is the share of samples with a stray speck of ink (evaluation/specks.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.devices import cpu_kind
from runtime.errors import UserError, run_cli
from runtime.flags import CliParser, require_positive

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]):
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = CliParser(prog="python -m bench.time_to_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "cpu.yaml")
    p.add_argument("--eval_samples", type=int, default=50, help="images per digit in each epoch's evaluation")
    args = p.parse_args(argv)
    require_positive(args, ("eval_samples",))
    args.train_flags = extra
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="time-to-quality-") as out:
        cmd = [
            sys.executable,
            "train.py",
            "--config",
            str(args.config),
            "--output_dir",
            out,
            "--eval_every",
            "1",
            "--eval_samples",
            str(args.eval_samples),
            *args.train_flags,
        ]
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            raise UserError(f"train.py failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1]}")
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    print(f"{' '.join(cmd[1:4])} {' '.join(args.train_flags)}: {cpu_kind()}; {wall:.0f} s for the whole command\n")
    print("| epoch | train s (cumulative) | accuracy | FMD / floor | thickness | width | specks | eval s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    train_seconds = 0.0
    epochs = {r["epoch"]: r for r in records if "epoch_seconds" in r}
    for record in (r for r in records if "eval_accuracy" in r):
        train_seconds += epochs[record["epoch"]]["epoch_seconds"]
        print(
            f"| {record['epoch']} | {train_seconds:.0f} | {record['eval_accuracy']:.1%} | "
            f"{record['eval_fmd'] / record['eval_fmd_floor']:.2f} | {record['eval_thickness_ratio']:.2f} | "
            f"{record['eval_width_ratio']:.2f} | {record['eval_speck_rate']:.1%} | {record['eval_seconds']:.0f} |"
        )


if __name__ == "__main__":
    run_cli(main)
