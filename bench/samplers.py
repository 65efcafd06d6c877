"""Sampler benchmark: wall time per 100 guided images for each sampler and step count, and the
judge's conditional accuracy when a trained checkpoint is given. A benchmark, not a test.

    python -m bench.samplers                                   # a fresh default UNet: timing only
    python -m bench.samplers --checkpoint outputs/mnist/checkpoints/checkpoint_epoch_0005.pt
    python -m bench.samplers --samplers ddim,dpmpp_2m --steps 10,20 --num_images 20 --threads 1
    python -m bench.samplers --checkpoint models/pretrained/mnist.pt --samplers dpmpp_2m_sde --steps 20 \
        --student models/pretrained/fast.pt                    # the teacher at its defaults, then its student

Without --checkpoint the network is a freshly initialised UNet of the default config with random
prompt tokens: every step costs what a trained one costs, so the times hold, but there is no
accuracy. With one, the prompts are the training wordings, num_images / 10 per digit. Every run
uses the same seeds, so samplers are compared on the same starting noise. One warm-up call first.
``--student`` adds a distilled student's rows (distill.py) at each of its step counts, on the same
prompts and noise, guidance folded in: one network call per step.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import torch

from data.captions import EMPTY_PROMPT, plan_prompts
from data.images import to_uint8
from data.shapes import IMAGE_SHAPE, NUM_DIGITS, TEXT_DIM, TEXT_TOKENS
from ddpm import (
    DEFAULT_SAMPLING,
    SAMPLERS,
    SPACINGS,
    THRESHOLDS,
    GaussianDiffusion,
    SamplingOptions,
    generate,
    prompt_contexts,
)
from ddpm.distillation import as_sampler_net, student_options
from ddpm.options import add_flags
from evaluation.judge import judge_images, load_judge
from evaluation.metrics import conditional_accuracy
from models.loading import load_trained_model
from models.unet import UNet
from runtime.devices import PRECISION_HELP, PRECISIONS, device_name, pick_device, use_bf16
from runtime.errors import UserError, run_cli
from runtime.flags import CliParser
from training.config import TrainConfig

DEFAULT_STEPS = "10,20,50,100,1000"


def comma_list(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(item) for item in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be a comma list like 10,20, got {text!r}") from None


def parse_args(argv: list[str]):
    p = CliParser(prog="python -m bench.samplers", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="trained checkpoint: adds the judge's accuracy")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma list of samplers")
    p.add_argument("--steps", default=DEFAULT_STEPS, help="comma list of step counts")
    p.add_argument("--num_images", type=int, default=100, help="images per run, a multiple of 10")
    p.add_argument("--batch_size", type=int, default=100, help="images per forward pass")
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_SAMPLING.guidance_scale)
    p.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SAMPLING.spacing)
    p.add_argument("--threshold", choices=THRESHOLDS, default=DEFAULT_SAMPLING.threshold)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (the benchmark's setting) or cuda")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default, one per core)")
    p.add_argument("--student", type=Path, help="a distilled checkpoint (distill.py): its rows after the others")
    add_flags(p, SamplingOptions, only=("guidance_interval",))
    args = p.parse_args(argv)
    args.samplers = comma_list(args.samplers, str, "--samplers")
    args.steps = comma_list(args.steps, int, "--steps")
    unknown = sorted(set(args.samplers) - set(SAMPLERS))
    if unknown:
        raise UserError(f"unknown sampler {unknown[0]!r}; --samplers takes a comma list of {', '.join(SAMPLERS)}")
    if min(args.steps) < 1:
        raise UserError(f"--steps must all be at least 1, got {min(args.steps)}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    if args.num_images < NUM_DIGITS or args.num_images % NUM_DIGITS or args.batch_size < 1:
        raise UserError(
            f"--num_images must be a positive multiple of {NUM_DIGITS} (got {args.num_images}) "
            f"and --batch_size at least 1 (got {args.batch_size})"
        )
    return args


def build(args, device: torch.device):
    """(net, diffusion, cond, uncond, digits, what): the trained model on the training wordings, or
    a fresh default UNet on random tokens (digits None)."""
    if args.checkpoint:
        model = load_trained_model(args.checkpoint, device)
        templates = model.vocabulary.templates
        plan = plan_prompts(args.num_images // NUM_DIGITS, {"seen": templates})
        cond, uncond = prompt_contexts(model.encoder.encode, plan.prompts, 1, EMPTY_PROMPT)
        return model.net, model.diffusion, cond, uncond, plan.digits, f"{args.checkpoint} (epoch {model.epoch})"
    cfg = TrainConfig()
    torch.manual_seed(args.seed)
    net = UNet(cfg.model).to(device).eval().requires_grad_(False)
    tokens = torch.randn(args.num_images + 1, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(args.seed))
    return (
        net,
        GaussianDiffusion.from_config(cfg.diffusion),
        tokens[1:].to(device),
        tokens[:1].to(device),
        None,
        "fresh default UNet (untrained)",
    )


def main() -> None:
    args = parse_args(sys.argv[1:])
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    net, diffusion, cond, uncond, digits, what = build(args, device)
    if max(args.steps) > diffusion.num_train_timesteps:
        raise UserError(
            f"--steps {max(args.steps)} exceeds the model's {diffusion.num_train_timesteps} training timesteps"
        )
    judge = load_judge(device=device) if digits is not None else None
    bf16 = use_bf16(args.precision, device)
    options = DEFAULT_SAMPLING.replace(
        guidance_scale=args.guidance_scale,
        guidance_interval=tuple(args.guidance_interval),
        spacing=args.spacing,
        threshold=args.threshold,
    )
    common = dict(image_shape=IMAGE_SHAPE, seed=args.seed, batch_size=args.batch_size, bf16=bf16)
    generate(net, diffusion, cond[:2], uncond, options.replace(sampler="ddim", steps=1), **common)  # warm-up

    params = sum(p.numel() for p in net.parameters()) / 1e6
    low, high = options.guidance_interval
    print(
        f"{what}, {params:.2f} M params; {args.num_images} images, guidance {args.guidance_scale} at "
        f"{low:g} < sigma <= {high:g} (2 network calls per guided image-step), batch {args.batch_size}, "
        f"{args.spacing} spacing, threshold "
        f"{args.threshold}, {'bf16' if bf16 else 'fp32'}; {device_name(device)} with "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("| sampler | steps | s / 100 images | images / s | accuracy |")
    print("|---|---:|---:|---:|---:|", flush=True)
    for name in args.samplers:
        for steps in args.steps:
            run = partial(generate, net, diffusion, cond, uncond, options.replace(sampler=name, steps=steps), **common)
            print(_row(name, steps, run, judge, digits), flush=True)
    if args.student:
        student_rows(args, device, options, (cond, uncond), common, judge, digits)


def student_rows(args, device: torch.device, options: SamplingOptions, contexts, common: dict, judge, digits) -> None:
    """The distilled student's rows, one per step count it samples in, after a warm-up call of its own."""
    student = load_trained_model(args.student, device)
    cond, uncond = contexts
    counts = student.distillation["student_steps"]

    def run(steps: int, prompts: torch.Tensor):
        negative = uncond if student.net.cfg.negative_input else None  # the empty prompt's tokens: none
        fast = as_sampler_net(student.net, student.diffusion, steps, args.guidance_scale, negative)
        used = student_options(options.replace(steps=steps))
        return partial(generate, fast, student.diffusion, prompts, uncond, used, **common)

    run(counts[0], cond[:2])()  # the warm-up
    for steps in counts:
        print(_row(f"distilled ({args.student.name})", steps, run(steps, cond), judge, digits), flush=True)


def _row(name: str, steps: int, run, judge, digits) -> str:
    """One table row: ``run()``'s images timed, and judged when there is a judge."""
    start = time.perf_counter()
    images = to_uint8(run())
    seconds = time.perf_counter() - start  # to_uint8 copies to the CPU, so a GPU has finished
    accuracy = "–" if judge is None else f"{conditional_accuracy(judge_images(judge, images)[0], digits):.1%}"
    return f"| {name} | {steps} | {seconds * 100 / len(images):.2f} | {len(images) / seconds:.1f} | {accuracy} |"


if __name__ == "__main__":
    run_cli(main)
