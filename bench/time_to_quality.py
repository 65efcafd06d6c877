"""Time to quality: a training run's quality against its wall time, epoch by epoch, guided and unguided,
printed as a table and drawn as a plot, so that recipes can be compared at equal time. A benchmark, not a test.

    python -m bench.time_to_quality                                  # train configs/cpu.yaml, then score it
    python -m bench.time_to_quality --config configs/cpu.yaml -- --num_epochs 6 --learning_rate 4e-3
    python -m bench.time_to_quality --run outputs/teacher --run outputs/seed --plot docs/time_to_quality.png

Without ``--run`` it trains ``--config`` (train.py's flags after ``--``) into a temporary folder; with
``--run`` it scores the epoch checkpoints of runs already made, or still training (train.py keeps every
epoch's checkpoint unless --keep_last says otherwise). Each epoch's checkpoint samples ``--eval_samples``
images per digit from the training wordings, from the same seeds at every epoch, twice: guided (guidance
6 above sigma 2, 20 steps of the default sampler) and at guidance scale 1 (unguided: the conditional
network alone). A checkpoint's scores are kept beside it (``..._ttq<N>.json``), so a run is scored once
however often it is plotted.

"train min" is the cumulative training time of metrics.jsonl's epochs (sampling grids and evaluations
excluded). FMD ratio is FMD over the real-vs-real floor of the same size (1.0 is perfect); thickness and
width are the samples' median over real test digits'; specks the share of samples with a stray speck of
ink (evaluation/specks.py). ``--plot`` needs matplotlib (``pip install -e .[bench]``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from data.captions import plan_prompts
from data.shapes import IMAGE_SHAPE
from models.checkpoint import EPOCH_NAME, list_checkpoints, load_checkpoint
from runtime.devices import PRECISIONS, cpu_kind
from runtime.errors import UserError, run_cli
from runtime.files import atomic_write
from runtime.flags import CliParser, require_positive
from text2digit import Text2Digit, make_request

ROOT = Path(__file__).resolve().parent.parent
# the sampling that was the default when these curves were first drawn (fixed, so that a cached score keeps
# its meaning when the default moves), and the conditional network alone
GUIDANCE = {
    "guided": {"guidance_scale": 6.0, "guidance_interval": (2.0, math.inf)},
    "unguided": {"guidance_scale": 1.0},
}
FIELDS = ("accuracy", "fmd_ratio", "thickness_ratio", "width_ratio", "speck_rate")


def parse_args(argv: list[str]):
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = CliParser(prog="python -m bench.time_to_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "cpu.yaml", help="the recipe to train")
    p.add_argument("--run", type=Path, action="append", help="score this run folder's epochs instead; repeatable")
    p.add_argument("--eval_samples", type=int, default=50, help="images per digit in each epoch's evaluation")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="sampling precision")
    p.add_argument("--plot", type=Path, help="also draw the curves of every run into this PNG")
    args = p.parse_args(argv)
    require_positive(args, ("eval_samples",))
    if args.run and extra:
        raise UserError("train.py flags after -- train a run; with --run the runs are already trained")
    args.train_flags = extra
    return args


def train(config: Path, flags: list[str], out: Path) -> None:
    """The recipe as train.py runs it, every epoch checkpointed."""
    cmd = [sys.executable, "train.py", "--config", str(config), "--output_dir", str(out), "--eval_every", "0", *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"train.py failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1]}")


def epoch_seconds(run: Path) -> dict[int, float]:
    """Each epoch's training seconds from the run's metrics.jsonl (the last record of an epoch run twice)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: --run takes a train.py output folder")
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["epoch"]: r["epoch_seconds"] for r in records if "epoch_seconds" in r}


def score_checkpoint(path: Path, per_digit: int, precision: str) -> dict[str, dict[str, float]]:
    """The checkpoint's scores guided and unguided (:data:`GUIDANCE`), computed once and kept beside it."""
    from evaluation.suite import judge_and_reference, score, summary_fields  # the judge: loaded only to score

    cached = path.with_name(f"{path.stem}_ttq{per_digit}_{precision}.json")
    if cached.is_file():
        return json.loads(cached.read_text())
    pipe = Text2Digit.from_checkpoint(path, "cpu", precision)
    plan = plan_prompts(per_digit, {"seen": pipe.model.vocabulary.templates})
    judge, reference = judge_and_reference(None, torch.device("cpu"))
    scores = {}
    for name, options in GUIDANCE.items():
        images = pipe.generate(make_request(plan.prompts, num_samples=1, seed=0, **options))
        seen = score(images.reshape(-1, *IMAGE_SHAPE[1:]), plan, judge, reference)["sets"]["seen"]
        fields = summary_fields(seen, "")
        scores[name] = {**fields, "fmd_ratio": fields["fmd"] / fields["fmd_floor"]}
    atomic_write(cached, lambda f: f.write((json.dumps(scores, indent=2) + "\n").encode()))
    return scores


def curve(run: Path, per_digit: int, precision: str) -> list[dict]:
    """One row per epoch checkpoint of ``run``: the epoch, the cumulative training minutes, its scores."""
    seconds = epoch_seconds(run)
    rows = []
    for checkpoint in (c for c in list_checkpoints(run) if c.epoch_end):
        epoch = int(EPOCH_NAME.match(checkpoint.path.name).group(1))
        minutes = sum(s for e, s in seconds.items() if e <= epoch) / 60
        rows.append({"epoch": epoch, "minutes": minutes, **score_checkpoint(checkpoint.path, per_digit, precision)})
        print(f"scored {checkpoint.path}", file=sys.stderr, flush=True)
    if not rows:
        raise UserError(f"no epoch checkpoint in {run}: train it first, keeping every epoch's checkpoint")
    return rows


def describe(run: Path) -> str:
    """The run's layout and schedule, from its newest checkpoint's config."""
    config = load_checkpoint(list_checkpoints(run)[-1].path)["config"]
    return (
        f"widths {config['widths']}, patch {config['patch_size']}, {config['num_epochs']} epochs of batch "
        f"{config['batch_size']}, lr {config['learning_rate']:g}"
    )


def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n{name}\n")
    print("| epoch | train min | unguided: accuracy | FMD / floor | thickness | width | guided (6): accuracy | "
          "FMD / floor | thickness | width | specks |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        u, g = row["unguided"], row["guided"]
        print(
            f"| {row['epoch']} | {row['minutes']:.1f} | {u['accuracy']:.1%} | {u['fmd_ratio']:.2f} | "
            f"{u['thickness_ratio']:.2f} | {u['width_ratio']:.2f} | {g['accuracy']:.1%} | {g['fmd_ratio']:.2f} | "
            f"{g['thickness_ratio']:.2f} | {g['width_ratio']:.2f} | {g['speck_rate']:.1%} |"
        )


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """Accuracy, FMD ratio, thickness and width against training minutes: a line per run and guidance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install -e '.[bench]'") from None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    labels = ("judge accuracy", "FMD / floor", "thickness / real", "width / real")
    for ax, key, label in zip(axes.flat, FIELDS, labels):
        for i, (name, rows) in enumerate(curves.items()):
            minutes = np.array([r["minutes"] for r in rows])
            for guidance, style in (("guided", "-"), ("unguided", "--")):
                values = [r[guidance][key] for r in rows]
                ax.plot(minutes, values, style, marker=".", color=f"C{i}", label=f"{name}, {guidance}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key != "accuracy" and key != "fmd_ratio":
            ax.axhline(1.0, color="grey", lw=0.8)
    for ax in axes[1]:
        ax.set_xlabel("training minutes")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    args = parse_args(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="time-to-quality-") as out:
        runs = args.run
        if not runs:
            train(args.config, args.train_flags, Path(out))
            runs = [Path(out)]
        curves = {str(run): curve(run, args.eval_samples, args.precision) for run in runs}
        layouts = {str(run): describe(run) for run in runs}
    title = f"{cpu_kind()}; {args.eval_samples} images per digit, {args.precision} sampling"
    print(title)
    for name, rows in curves.items():
        print_table(f"{name}: {layouts[name]}", rows)
    if args.plot:
        plot(curves, args.plot, title)


if __name__ == "__main__":
    run_cli(main)
