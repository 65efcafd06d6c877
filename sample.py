"""Generate digits from text prompts with a trained checkpoint.

    python sample.py --prompt "7"
    python sample.py --prompt "3" --prompt "a handwritten eight" --num_samples 16 --steps 20
    python sample.py --prompt "3" --sampler ddim --eta 0.5 --steps 50 --save_individual --trajectory

Loads the model models.checkpoint.find_model names (--checkpoint, else the newest in --output_dir,
else the shipped model) with the text encoder it was trained with, samples with classifier-free
guidance, writes one PNG row per prompt and prints the file's path (then those of the
--save_individual folder and the --trajectory GIF). Image i of a run depends only on --seed and i:
the same seed gives the same pixels whatever --batch_size, and adding prompts or samples does not
change the images before them.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from data.captions import EMPTY_PROMPT
from data.images import save_grid, save_images
from data.trajectory import TrajectoryRecorder
from ddpm import DEFAULT_BATCH_SIZE, SamplingOptions
from ddpm.options import add_flags, flag_values, refused_as
from models.checkpoint import DEFAULT_OUTPUT_DIR, add_model_flags, find_model
from runtime.devices import PRECISIONS, pick_device
from runtime.errors import UserError, run_cli
from runtime.files import writable_folder
from runtime.flags import CliParser, require_positive
from text2digit import Request, Text2Digit, flag, make_request


def build_parser() -> CliParser:
    p = CliParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    add_flags(p, Request)  # --prompt, --num_samples, --seed, --negative_prompt, --allow_truncation
    add_flags(p, SamplingOptions)  # --sampler, --steps, --guidance_scale, ...
    add_model_flags(p)
    p.add_argument(
        "--batch_size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="images per forward pass (does not change the images)",
    )
    p.add_argument("--out", type=Path, help="PNG path (default: <output_dir>/samples/sample_<prompt>_seed<seed>.png)")
    p.add_argument(
        "--save_individual",
        action="store_true",
        help="also write each image as its own PNG, in a folder named like --out without .png",
    )
    p.add_argument(
        "--trajectory",
        action="store_true",
        help="also write a GIF of the denoising (x_t and the x0 prediction per step) beside --out",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--text_encoder", help="override the checkpoint's text-encoder weights (must match it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="network precision. fp32 (default) keeps image i the same whatever --batch_size; bf16 "
        "(auto: where the hardware does it natively) is ~2x faster on such CPUs, but its pixels "
        "then vary slightly with the batch size",
    )
    return p


def parse_args(argv: list[str]):
    """The flags, every value checked before any work (the request by the pipeline's own rules)."""
    args = build_parser().parse_args(argv)
    if args.out is not None and args.out.suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {args.out}")
    with refused_as(flag):
        values = {**flag_values(args, Request), **flag_values(args, SamplingOptions)}
        args.request = make_request(**values)
        args.request.validate()  # what needs no model; the rest once it is loaded
    require_positive(args, ("batch_size",))
    return args


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def default_out(args) -> Path:
    folder = args.output_dir or DEFAULT_OUTPUT_DIR
    return folder / "samples" / f"sample_{slug('_'.join(args.prompts))}_seed{args.seed}.png"


def output_paths(args, out: Path) -> tuple[Path, Path | None, Path | None]:
    """The grid PNG, the --save_individual folder and the --trajectory GIF (None when not asked for).
    Checked before any work, so a refused run writes nothing."""
    folder = out.with_suffix("") if args.save_individual else None
    gif = out.with_suffix(".gif") if args.trajectory else None
    for path in (out, folder, gif):
        if path is not None and path.exists() and not args.overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it or --out to write elsewhere")
    return out, folder, gif


def warn_about_negative_prompt(args) -> None:
    if args.negative_prompt != EMPTY_PROMPT and args.guidance_scale == 1.0:
        print("warning: --negative_prompt has no effect at --guidance_scale 1 (no unconditional half)", file=sys.stderr)


def main() -> None:
    args = parse_args(sys.argv[1:])
    device = pick_device(args.device)
    out = args.out or default_out(args)
    with writable_folder(out.parent, "--out" if args.out else "--output_dir"):  # removed again if refused
        sample(args, device, *output_paths(args, out))


def sample(args, device, out: Path, folder: Path | None, gif: Path | None) -> None:
    path = find_model(args.checkpoint, args.output_dir)
    pipe = Text2Digit.from_checkpoint(path, str(device), args.precision, args.text_encoder, args.guide_checkpoint)
    request = pipe.resolved(args.request)  # the model's own steps where none were asked for
    with refused_as(flag):  # what only the model can tell: its number of timesteps, the words it knows
        warnings = pipe.check(request)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    warn_about_negative_prompt(args)
    recorder = TrajectoryRecorder(request.options.steps) if gif else None
    start = time.perf_counter()
    with refused_as(flag):
        digits = pipe.generate(request, callback=recorder, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    save_grid(list(digits), [f'"{p}"' for p in args.prompts], out)
    flat = digits.reshape(-1, *digits.shape[2:])
    if folder:
        save_images(
            flat, [f"{i:04d}_{slug(args.prompts[i // args.num_samples])}.png" for i in range(len(flat))], folder
        )
    if recorder:
        recorder.save_gif(flat, args.prompts, gif)
    used = pipe.sampled_with(request.options)
    model = "distilled" if pipe.model.distillation else f"epoch {pipe.model.epoch}"
    print(
        f"{len(flat)} images from {path} ({model}) with {used.sampler}, {used.steps} steps "
        f"({used.spacing}), guidance {args.guidance_scale}, threshold {used.threshold}, "
        f"{'bf16' if pipe.bf16 else 'fp32'} on {device}, in {elapsed:.1f} s",
        file=sys.stderr,
    )
    for written in (out, folder, gif):
        if written:
            print(written)


if __name__ == "__main__":
    run_cli(main)
