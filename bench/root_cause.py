"""Where the digits' boldness, width and specks come from: one factor at a time. A benchmark, not a test.

    python -m bench.root_cause --checkpoint outputs/cpu/checkpoints/checkpoint_epoch_0002.pt
    python -m bench.root_cause --checkpoint A.pt --models outputs/p1/checkpoints/checkpoint_epoch_0004.pt \\
        outputs/cpu/checkpoints/checkpoint_epoch_0001.pt --per_digit 50

One model (``--checkpoint``, a training checkpoint: it holds the raw weights beside the EMA ones) is
sampled for ``--per_digit`` images of each digit, prompted by its numeral, from the same seeds in every
row, changing one thing at a time from the table's base sampling (``CAUSES``): the sampler and its
steps with guidance off, the guidance scale, the thresholding and the EMA against the raw weights.
``--table guidance`` samples the guidance methods instead (``GUIDANCE``: adaptive projected guidance,
other intervals and, with ``--guide_checkpoint``, autoguidance), and ``--table samplers`` the SDE
solver against the ODE's (``SOLVERS``). Each model of ``--models`` (another patch size, an earlier
epoch) is then sampled at the table's base. Every row is
judged (accuracy, Fréchet distance beside the real floor at the same count) and measured (median
thickness and width over the real test digits', and the speck rate beside the real test set's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from data.captions import plan_prompts
from ddpm import DEFAULT_SAMPLING, SamplingOptions
from evaluation.reference import RealReference
from evaluation.suite import judge_and_reference, score
from models.checkpoint import load_checkpoint
from models.loading import TrainedModel, load_trained_model
from models.unet import UNet
from runtime.devices import PRECISION_HELP, PRECISIONS, pick_device, use_bf16
from runtime.errors import UserError, run_cli
from runtime.files import atomic_write
from runtime.flags import CliParser
from text2digit import Request, Text2Digit

# (label, sampling options changed from the table's base, network: "ema", "raw" weights, or "guided" by
# --guide_checkpoint's autoguidance): one factor at a time. The causes and the guidance were measured from
# the defaults before the SDE solver became the default: their base is the ODE solver, dpmpp_2m.
ODE = {"sampler": "dpmpp_2m"}
CAUSES: tuple[tuple[str, dict, str], ...] = (
    ("dpmpp_2m (ODE), 20 steps, guidance 6 at sigma > 2", {}, "ema"),
    ("ddpm, 1000 steps, no guidance", {"sampler": "ddpm", "steps": 1000, "guidance_scale": 1.0}, "ema"),
    ("default sampler and steps, no guidance", {"guidance_scale": 1.0}, "ema"),
    ("default sampler, 50 steps, no guidance", {"steps": 50, "guidance_scale": 1.0}, "ema"),
    ("ddpm, 1000 steps, default guidance", {"sampler": "ddpm", "steps": 1000}, "ema"),
    ("guidance 0 (unconditional)", {"guidance_scale": 0.0}, "ema"),
    ("guidance 2", {"guidance_scale": 2.0}, "ema"),
    ("guidance 4", {"guidance_scale": 4.0}, "ema"),
    ("threshold none", {"threshold": "none"}, "ema"),
    ("raw weights (no EMA)", {}, "raw"),
)
# guidance that does not over-saturate, against the default (--table guidance)
GUIDANCE: tuple[tuple[str, dict, str], ...] = (
    ("dpmpp_2m, CFG 6 at sigma > 2", {}, "ema"),
    ("APG eta 0, scale 6 at sigma > 2", {"guidance_parallel": 0.0}, "ema"),
    ("APG eta 0, scale 8 at sigma > 2", {"guidance_parallel": 0.0, "guidance_scale": 8.0}, "ema"),
    ("CFG 6 at sigma > 4", {"guidance_interval": (4.0, math.inf)}, "ema"),
    ("CFG 6 at sigma > 1", {"guidance_interval": (1.0, math.inf)}, "ema"),
    ("CFG 6 at 1 < sigma <= 10", {"guidance_interval": (1.0, 10.0)}, "ema"),
    ("CFG 4 at sigma > 2", {"guidance_scale": 4.0}, "ema"),
    ("autoguidance 2, every step", {"guidance_scale": 2.0, "guidance_interval": (0.0, math.inf)}, "guided"),
    ("autoguidance 3, every step", {"guidance_scale": 3.0, "guidance_interval": (0.0, math.inf)}, "guided"),
    ("autoguidance 2 at sigma > 2", {"guidance_scale": 2.0}, "guided"),
)
# the solver: stochastic (SDE) sampling against the ODE's, at the default guidance and less (--table samplers)
SOLVERS: tuple[tuple[str, dict, str], ...] = (
    ("dpmpp_2m (ODE), 20 steps", ODE, "ema"),
    ("defaults: dpmpp_2m_sde, 20 steps", {}, "ema"),
    ("dpmpp_2m_sde, 10 steps", {"sampler": "dpmpp_2m_sde", "steps": 10}, "ema"),
    ("dpmpp_2m_sde, 40 steps", {"sampler": "dpmpp_2m_sde", "steps": 40}, "ema"),
    ("dpmpp_2m_sde, 20 steps, guidance 4", {"sampler": "dpmpp_2m_sde", "guidance_scale": 4.0}, "ema"),
    ("dpmpp_2m_sde, 20 steps, guidance 3", {"sampler": "dpmpp_2m_sde", "guidance_scale": 3.0}, "ema"),
    ("dpmpp_2m_sde, 20 steps, rescale 0.7", {"sampler": "dpmpp_2m_sde", "guidance_rescale": 0.7}, "ema"),
    ("dpmpp_2m_sde, 20 steps, rescale 1", {"sampler": "dpmpp_2m_sde", "guidance_rescale": 1.0}, "ema"),
    (
        "dpmpp_2m_sde, 20 steps, guidance 8 at sigma > 4",
        {"sampler": "dpmpp_2m_sde", "guidance_scale": 8.0, "guidance_interval": (4.0, math.inf)},
        "ema",
    ),
    (
        "dpmpp_2m_sde, autoguidance 3, every step",
        {"guidance_scale": 3.0, "guidance_interval": (0.0, math.inf)},
        "guided",
    ),
    (
        "dpmpp_2m_sde, autoguidance 4, every step",
        {"guidance_scale": 4.0, "guidance_interval": (0.0, math.inf)},
        "guided",
    ),
    ("dpmpp_2m_sde, autoguidance 4 at sigma > 2", {"guidance_scale": 4.0}, "guided"),
    ("dpmpp_2m_sde, autoguidance 5 at sigma > 2", {"guidance_scale": 5.0}, "guided"),
    ("dpmpp_2m_sde, autoguidance 6 at sigma > 2", {"guidance_scale": 6.0}, "guided"),
    ("ddpm, 20 steps", {"sampler": "ddpm"}, "ema"),
    ("ddpm, 100 steps", {"sampler": "ddpm", "steps": 100}, "ema"),
)
TABLES = {"causes": (CAUSES, ODE), "guidance": (GUIDANCE, ODE), "samplers": (SOLVERS, {})}  # rows, base


def parse_args(argv: list[str]):
    p = CliParser(prog="python -m bench.root_cause", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (raw and EMA weights)")
    p.add_argument("--models", type=Path, nargs="*", default=[], help="more checkpoints, sampled at the table's base")
    p.add_argument("--guide_checkpoint", type=Path, help="the worse model of the autoguidance rows (else skipped)")
    p.add_argument("--per_digit", type=int, default=100, help="images of each digit per row")
    p.add_argument("--table", choices=tuple(TABLES), default="causes", help="which rows")
    p.add_argument("--rows", default="", help="comma list of the table's row numbers to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.per_digit < 2:
        raise UserError(f"--per_digit must be at least 2 (a covariance needs two images), got {args.per_digit}")
    table_rows, args.base = TABLES[args.table]
    rows = [row for row in table_rows if row[2] != "guided" or args.guide_checkpoint]
    try:
        args.rows = [rows[int(i)] for i in args.rows.split(",")] if args.rows else list(rows)
    except (ValueError, IndexError):
        raise UserError(f"--rows takes a comma list of 0..{len(rows) - 1}, got {args.rows!r}") from None
    return args


def with_raw_weights(model: TrainedModel) -> TrainedModel:
    """The same model with the raw (not averaged) training weights, from its training checkpoint."""
    payload = load_checkpoint(model.path, map_location=next(model.net.parameters()).device)
    if "model" not in payload:
        raise UserError(f"{model.path} holds no raw weights (a shipped model): pass a training checkpoint")
    net = UNet(model.saved.unet).to(next(model.net.parameters()).device)
    net.load_state_dict(payload["model"])
    return dataclasses.replace(model, net=net.eval().requires_grad_(False))


def row_scores(pipe: Text2Digit, options: SamplingOptions, args, reference: RealReference, judge) -> dict:
    """Judge and measure ``per_digit`` images of each digit sampled with ``options``."""
    plan = plan_prompts(args.per_digit, {"seen": ("{d}",)})
    start = time.perf_counter()
    images = pipe.generate(Request(tuple(plan.prompts), 1, options, args.seed))[:, 0]
    seen = score(images, plan, judge, reference)["sets"]["seen"]
    return {**seen, "sample_seconds": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
    lines = [
        "| row | accuracy | FMD (floor) | FMD / floor | thickness | width | specks (real) | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        thick, wide = (r["shape"][k] / r["real_shape"][k] - 1 for k in ("thickness", "width"))
        lines.append(
            f"| {r['label']} | {r['accuracy']:.1%} | {r['fmd']:.2f} ({r['fmd_floor']:.2f}) | "
            f"{r['fmd'] / r['fmd_floor']:.2f} | {thick:+.0%} | {wide:+.0%} | "
            f"{r['speck_rate']:.1%} ({r['real_speck_rate']:.1%}) | {r['sample_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args(sys.argv[1:])
    device = pick_device(args.device)
    bf16 = use_bf16(args.precision, device)
    judge, reference = judge_and_reference(args.data_dir, device)
    model = load_trained_model(args.checkpoint, device)
    pipes = {"ema": Text2Digit(model, bf16)}
    if any(network == "raw" for _, _, network in args.rows):
        pipes["raw"] = Text2Digit(with_raw_weights(model), bf16)
    if args.guide_checkpoint:
        pipes["guided"] = Text2Digit(model, bf16, load_trained_model(args.guide_checkpoint, device))
    base = DEFAULT_SAMPLING.replace(**args.base)
    print(f"{args.checkpoint} (epoch {model.epoch}); {args.per_digit} images per digit, seed {args.seed}, "
          f"{'bf16' if bf16 else 'fp32'} on {device}; the rows change: {base}\n", flush=True)  # fmt: skip
    rows = []
    for label, changes, network in args.rows:
        rows.append({"label": label, **row_scores(pipes[network], base.replace(**changes), args, reference, judge)})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    for path in args.models:
        other = load_trained_model(path, device)
        label = f"{path} (patch {other.saved.unet.patch_size}, epoch {other.epoch}), the table's base"
        rows.append({"label": label, **row_scores(Text2Digit(other, bf16), base, args, reference, judge)})
    print(f"\n{table(rows)}")
    if args.out:
        atomic_write(args.out, lambda f: f.write(json.dumps(rows, indent=2, default=float).encode()))


if __name__ == "__main__":
    run_cli(main)
