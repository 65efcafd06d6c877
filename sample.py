"""Generate digits from text prompts with a trained checkpoint.

    python sample.py --prompt "7"
    python sample.py --prompt "3" --prompt "a handwritten eight" --num_samples 16 --steps 20

Loads the newest checkpoint in --output_dir (or --checkpoint PATH) with the text encoder it was
trained with, samples with classifier-free guidance, writes one PNG row per prompt and prints
the file's path. The same seed gives the same images.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

from config import CliParser
from data import EMPTY_PROMPT
from data.images import save_grid, to_uint8
from ddpm import SAMPLERS, generate
from errors import UserError, run_cli
from models.checkpoint import latest_checkpoint
from models.loading import load_trained_model


def parse_args(argv: list[str]):
    p = CliParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several rows")
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: newest in --output_dir)")
    p.add_argument("--output_dir", type=Path, default=Path("outputs/mnist"), help="training output folder")
    p.add_argument("--num_samples", type=int, default=8, help="images per prompt")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance_scale", type=float, default=8.0, help="classifier-free guidance scale s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--out", type=Path, help="PNG path (default: <output_dir>/samples/sample_<prompt>_seed<seed>.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--text_encoder", help="override the checkpoint's text-encoder weights (must match it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    for name in ("num_samples", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.guidance_scale < 0:
        raise UserError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    for prompt in args.prompt:
        if not prompt.strip():
            raise UserError("--prompt is empty; give the digit to draw, e.g. --prompt \"7\"")
    return args


def pick_device(flag: str) -> torch.device:
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {flag} asked for CUDA but none is available; use --device cpu")
    return torch.device(flag)


def default_out(args) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", "_".join(args.prompt).lower()).strip("-")[:40] or "prompt"
    return args.output_dir / "samples" / f"sample_{slug}_seed{args.seed}.png"


def main() -> None:
    args = parse_args(sys.argv[1:])
    device = pick_device(args.device)
    out = args.out or default_out(args)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it or --out to write elsewhere")
    path = args.checkpoint or latest_checkpoint(args.output_dir)
    if path is None:
        raise UserError(f"no checkpoint in {args.output_dir / 'checkpoints'}; train first (python train.py) "
                        "or pass --checkpoint PATH")
    model = load_trained_model(path, device, args.text_encoder)
    if args.steps > model.diffusion.num_steps:
        raise UserError(f"--steps {args.steps} exceeds the model's {model.diffusion.num_steps} training timesteps")
    for prompt in args.prompt:
        if model.encoder.is_truncated(prompt):
            print(f"warning: prompt {prompt!r} is longer than 8 CLIP tokens and was truncated", file=sys.stderr)

    tokens, _ = model.encoder.encode(args.prompt + [EMPTY_PROMPT])
    cond = tokens[:-1].repeat_interleave(args.num_samples, dim=0)
    start = time.perf_counter()
    images = generate(model.net, model.diffusion, cond, tokens[-1:], sampler=args.sampler, steps=args.steps,
                      guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    rows = to_uint8(images).reshape(len(args.prompt), args.num_samples, 28, 28)
    save_grid(list(rows), [f'"{p}"' for p in args.prompt], out)
    print(f"{len(images)} images from {path} (epoch {model.epoch}) with {args.sampler}, {args.steps} steps, "
          f"guidance {args.guidance_scale}, in {elapsed:.1f} s", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    run_cli(main)
