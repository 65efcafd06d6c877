"""The models that ship with the repository, so that a fresh clone samples at once.

``models/pretrained/NAME.pt`` holds the EMA weights of a model trained by recipe NAME (``RECIPES``) in
float16, with the rest of what sampling reads of a checkpoint (written by models/checkpoint.py's
writer); ``NAME.json`` beside it says how it was made: the command, the commit, the config, its sha256
and what evaluate.py scored. ``fast`` is the model the commands load when none is named
(``models.checkpoint.SHIPPED``): ``mnist``, the teacher (``models.checkpoint.TEACHER``, configs/mnist.yaml),
distilled into a few-step student (distill.py); ``guide`` guides the teacher on request (autoguidance: the
epoch-1 checkpoint of the quick-start recipe as it was before it drew log-normal noise levels); ``cpu`` is
the README's quick start, the record of what ``make demo`` reproduces.

    python -m models.pretrained --name cpu --checkpoint outputs/cpu/checkpoints/checkpoint_epoch_0002.pt \\
        --evaluation outputs/cpu/checkpoints/checkpoint_epoch_0002_eval_..._seed0.json

re-makes both files from a trained checkpoint and its evaluation (whoever changes a recipe re-runs it).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import PRETRAINED_DIR, SAMPLING_KEYS, load_checkpoint, save_checkpoint
from runtime.errors import UserError, run_cli
from runtime.files import atomic_write
from runtime.flags import CliParser

RECIPES = {
    "mnist": "python train.py --config configs/mnist.yaml",  # the teacher the shipped student is distilled from
    "cpu": "python train.py --config configs/cpu.yaml",  # the README's quick start (make demo)
    # the teacher distilled into a cpu.pt-sized student that samples in 1, 2 or 4 steps, guided away from
    # negative prompts too (distill.py's defaults: docs/distillation.md): the model the commands load
    "fast": "python distill.py",
    # a bad version of the same data, small and briefly trained, for autoguidance (Karras et al. 2024)
    "guide": (
        "python train.py --config configs/cpu.yaml --num_epochs 4 --timestep_sampling uniform, "
        "its checkpoint of epoch 1"
    ),
}
GUIDES = ("guide",)  # recipes whose model only guides another: shipped without scores of its own
EVALUATION_KEYS = ("sampler", "steps", "guidance_scales", "guide_checkpoint", "seed", "bf16", "device")


def ship(checkpoint: Path, evaluation: Path | None, name: str, folder: Path = PRETRAINED_DIR) -> dict[str, Any]:
    """Write ``folder``/NAME.pt (what sampling reads of ``checkpoint``, the EMA weights in float16) and its
    record, NAME.json, with the scores of ``evaluation`` (None for a model that only guides another)."""
    out = folder / f"{name}.pt"
    payload = load_checkpoint(checkpoint)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in payload["ema"]["weights"].items()}
    ema = {"weights": weights, "updates": payload["ema"]["updates"]}
    kept = [*SAMPLING_KEYS, *(["distillation"] if "distillation" in payload else [])]  # a student's record too
    save_checkpoint({**{key: payload[key] for key in kept}, "ema": ema}, out)
    scores = json.loads(evaluation.read_text()) if evaluation else {"results": []}
    record = {
        "weights": out.name,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "storage": "EMA weights in float16, config and text-encoder record; no optimizer state",
        "command": RECIPES[name],
        "commit": _commit(),
        "trained_from": str(checkpoint),
        "epoch": payload["epoch"],
        "step": payload.get("step"),
        "config": payload["config"],
        "text_encoder": payload["text_encoder"],
        "vocabulary": payload["vocabulary"],
        "versions": {"torch": torch.__version__},
        "distillation": payload.get("distillation"),
        "evaluation": {key: scores[key] for key in EVALUATION_KEYS if key in scores} or None,
        "scores": [_scores(result) for result in scores["results"]],
    }
    atomic_write(out.with_suffix(".json"), lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
    return record


def _scores(result: dict) -> dict:
    sets = result["sets"]
    scores = {f"accuracy_{name}": s["accuracy"] for name, s in sets.items()}
    scores.update({f"fmd_{name}": s["fmd"] for name, s in sets.items()})
    scores.update({f"fmd_floor_{name}": s["fmd_floor"] for name, s in sets.items()})
    for key in ("shape", "real_shape", "speck_rate", "real_speck_rate"):  # absent from older evaluations
        scores.update({f"{key}_{name}": s[key] for name, s in sets.items() if key in s})
    if "styles" in result:
        scores["styles"] = result["styles"]["summary"]  # evaluate.py's JSON carries it
    if "prompts" in result:
        scores["prompts"] = result["prompts"]["summary"]
    return {"guidance_scale": result["guidance_scale"], **scores}


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = CliParser(prog="python -m models.pretrained", description="Re-make a shipped model from a checkpoint.")
    p.add_argument("--name", choices=tuple(RECIPES), required=True, help="which shipped model: its recipe")
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint trained by that recipe")
    p.add_argument("--evaluation", type=Path, help="evaluate.py's JSON for that checkpoint (none for the guide)")
    args = p.parse_args(sys.argv[1:])
    if args.evaluation is None and args.name not in GUIDES:
        raise UserError(f"--name {args.name} needs --evaluation: run evaluate.py --checkpoint {args.checkpoint}")
    if args.evaluation is not None and not args.evaluation.is_file():
        raise UserError(f"--evaluation {args.evaluation} not found; run evaluate.py --checkpoint {args.checkpoint}")
    record = ship(args.checkpoint, args.evaluation, args.name)
    out = PRETRAINED_DIR / record["weights"]
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json')}: sha256 {record['sha256']}")


if __name__ == "__main__":
    run_cli(main)
