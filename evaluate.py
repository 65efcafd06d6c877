"""Measure what a checkpoint makes: conditional accuracy and Fréchet MNIST distance.

    python evaluate.py                                        # the model models.checkpoint.find_model names
    python evaluate.py --checkpoint PATH --guidance_scale 1,2,4,8 --num_samples 100

For every digit, --num_samples images are drawn from the training wordings ("seen") and as many
from held-out wordings never trained on; the committed judge classifier (evaluation/judge.pt)
labels them. Reported per guidance scale: the fraction labelled as the prompted digit (overall,
per digit, per template) and the Fréchet distance between the judge's features of the samples
and of real MNIST test digits, beside the same distance between two halves of real data (the
floor). Tables go to stdout; a JSON file (and, for a sweep, a PNG plot) goes beside the checkpoint
(the shipped model's to outputs/pretrained/).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.captions import EMPTY_PROMPT, Vocabulary, canonical_prompt, plan_prompts
from data.images import save_grid
from data.mnist import load_mnist, mnist_cache_dir
from ddpm import DEFAULT_BATCH_SIZE, DEFAULT_SAMPLING, SamplingOptions
from ddpm.options import InvalidRequest, add_flags, flag_values, refused_as, shown, to_json
from evaluation.judge import JUDGE_PATH, judge_record
from evaluation.prompts import evaluate_prompts, prompt_summary, prompt_tables
from evaluation.reference import RealReference
from evaluation.report import plot_sweep, result_tables, sweep_table
from evaluation.styles import SampleFn, StyleReference, evaluate_styles, style_picture_rows, style_tables, summary
from evaluation.suite import judge_and_reference, score
from models.checkpoint import DEFAULT_OUTPUT_DIR, PRETRAINED_DIR, add_model_flags, find_model
from models.loading import TrainedModel
from runtime.devices import PRECISION_HELP, PRECISIONS, pick_device, use_bf16
from runtime.errors import UserError, run_cli
from runtime.files import atomic_write, writable_folder
from runtime.flags import CliParser, require_positive
from text2digit import MAX_IMAGES, Request, Text2Digit, flag

PICTURE_COLUMNS = 8
SHIPPED_RESULTS = DEFAULT_OUTPUT_DIR.parent / "pretrained"  # outputs/pretrained
# the SamplingOptions fields beyond those the file names and the report have always held
OTHER_OPTIONS = tuple(f.name for f in fields(SamplingOptions) if f.name not in ("sampler", "steps", "guidance_scale"))


def parse_scales(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--guidance_scale must be a number or a comma list like 1,2,4,8, got {text!r}") from None


def build_parser() -> CliParser:
    p = CliParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    # evaluate's own forms of two request fields: a count per digit and prompt set, and a sweep of scales
    p.add_argument("--num_samples", type=int, default=100, help="images per digit for each prompt set")
    p.add_argument(
        "--guidance_scale",
        default=f"{DEFAULT_SAMPLING.guidance_scale:g}",
        help="classifier-free guidance scale, or a comma list to sweep",
    )
    add_flags(p, SamplingOptions, skip=("guidance_scale",))  # --sampler, --steps, ... as in sample.py
    add_flags(p, Request, only=("seed", "unknown_words"))
    p.add_argument(
        "--style_samples",
        type=int,
        default=20,
        help="images per style prompt (a thick 7, ...) for a model trained on style captions; 0: none",
    )
    p.add_argument(
        "--prompt_samples",
        type=int,
        default=20,
        help="images per digit of each wording and style word in the prompt benchmark (evaluation/prompts.py); 0: none",
    )
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass")
    p.add_argument("--data_dir", help="folder holding MNIST (default: the cache)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    return p


def parse_args(argv: list[str]):
    """The flags, every value checked before any work (the sampling options by their declared rules)."""
    args = build_parser().parse_args(argv)
    require_positive(args, ("num_samples", "batch_size"))
    for name in ("style_samples", "prompt_samples"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    args.guidance_scale = parse_scales(args.guidance_scale)
    with refused_as(flag):  # every value checked by the declaration's rules, before any work
        Request((), seed=args.seed, unknown_words=args.unknown_words)
        fixed = flag_values(args, SamplingOptions, skip=("guidance_scale",))
        args.options = [SamplingOptions(**fixed, guidance_scale=scale) for scale in args.guidance_scale]
    return args


def output_path(args, checkpoint: Path, suffix: str) -> Path:
    """Beside the checkpoint, named by the settings, so runs with other settings do not overwrite it."""
    scales = "-".join(f"{s:g}" for s in args.guidance_scale)
    others = "".join(  # the other options, only where they differ from the defaults (the names stay as they were)
        f"_{name}{shown(getattr(args.options[0], name)).replace(' ', '-')}"
        for name in OTHER_OPTIONS
        if getattr(args.options[0], name) != getattr(DEFAULT_SAMPLING, name)
    )
    unknown = "" if args.unknown_words == "auto" else f"_unknown-words-{args.unknown_words}"
    guide = "" if args.guide_checkpoint is None else f"_guide-{args.guide_checkpoint.stem}"
    return results_dir(checkpoint) / (
        f"{checkpoint.stem}_eval_{args.sampler}_{args.steps}steps_cfg{scales}"
        f"_n{args.num_samples}_seed{args.seed}{others}{unknown}{guide}{suffix}"
    )


def sample_plan(
    pipe: Text2Digit,
    prompts: list[str],
    options: SamplingOptions,
    args,
    per_prompt: int = 1,
    negative_prompt: str = EMPTY_PROMPT,
    shared_noise: bool = False,
):
    """uint8 [len(prompts), per_prompt, 28, 28] through the pipeline, with a progress bar on stderr."""
    request = Request(
        tuple(prompts), per_prompt, options, args.seed, negative_prompt,
        unknown_words=args.unknown_words, shared_noise=shared_noise,
    )  # fmt: skip
    label = f"guidance {options.guidance_scale:g}" + (f', negative "{negative_prompt}"' if negative_prompt else "")
    with tqdm(total=len(prompts) * per_prompt, desc=label, unit="img", dynamic_ncols=True, file=sys.stderr) as bar:
        return pipe.generate(request, batch_size=args.batch_size, progress=bar.update)


def build_report(
    args,
    model: TrainedModel,
    device: torch.device,
    judge: dict,
    reference: RealReference,
    results: list[dict],
    seconds: float,
) -> dict:
    """Everything needed to compare this evaluation with another: settings, judge, reference, results."""
    return {
        "checkpoint": str(model.path),
        "guide_checkpoint": None if args.guide_checkpoint is None else str(args.guide_checkpoint),
        "epoch": model.epoch,
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance_scales": args.guidance_scale,
        "options": {name: to_json(getattr(args.options[0], name)) for name in OTHER_OPTIONS},
        "seed": args.seed,
        "num_samples_per_digit": args.num_samples,
        "batch_size": args.batch_size,
        "device": str(device),
        "bf16": args.bf16,
        "judge": {
            "weights": str(JUDGE_PATH),
            "weights_sha256": judge["weights_sha256"],
            "recorded_test_accuracy": judge["test_accuracy"],
            "accuracy_on_real_half_a": reference.judge_accuracy,
        },
        "reference": {
            "data": "MNIST test set split per digit into halves A and B; samples are compared "
            "with B, the floor is A (as many images per digit as the samples) vs B",
            "half_a_images": len(reference.floor_labels),
            "half_b_images": reference.reference_images,
        },
        "results": results,
        "wall_seconds": seconds,
        "train_config": model.saved.config,
        "distillation": model.distillation,
    }


def style_reference(args, vocabulary: Vocabulary) -> StyleReference | None:
    """Real MNIST's measures for the style prompts, for a model trained on style captions (else None)."""
    if not vocabulary.attributes or not args.style_samples:
        return None
    return StyleReference.from_mnist(vocabulary, load_mnist(args.data_dir), mnist_cache_dir())


def style_sampler(pipe: Text2Digit, options: SamplingOptions, args) -> SampleFn:
    """Images of style prompts, image j of every prompt from the same seed: only the words differ. In
    requests of at most MAX_IMAGES, which that shared noise leaves unchanged."""

    def sample(prompts: list[str], per_prompt: int, negative: str) -> np.ndarray:
        chunk = MAX_IMAGES // per_prompt
        parts = [prompts[i : i + chunk] for i in range(0, len(prompts), chunk)]
        return np.concatenate([sample_plan(pipe, part, options, args, per_prompt, negative, True) for part in parts])

    return sample


def style_picture(sample, vocabulary: Vocabulary) -> Callable[[Path], None]:
    """Rows low word / plain / high word per digit and attribute, the same seeds in every row; sampled
    now, written by the returned function once the report is safely on disk."""
    prompts = style_picture_rows(vocabulary)
    images = sample(prompts, PICTURE_COLUMNS, EMPTY_PROMPT)
    return partial(save_grid, list(images), [f'"{p}"' for p in prompts])


def evaluate_scale(pipe: Text2Digit, options: SamplingOptions, plan, references, args) -> tuple[dict, Callable | None]:
    """One guidance scale's scores, printed, and the writer of its style picture (None without styles)."""
    judge, reference, styles = references
    t0 = time.perf_counter()
    images = sample_plan(pipe, plan.prompts, options, args)[:, 0]
    result, picture = {"guidance_scale": options.guidance_scale, **score(images, plan, judge, reference)}, None
    sample = style_sampler(pipe, options, args)
    if styles is not None:
        result["styles"] = evaluate_styles(sample, styles, judge, args.style_samples, pipe.reads_negative_prompt)
        result["styles"]["summary"] = summary(result["styles"])  # what models/pretrained.py records
        picture = style_picture(sample, styles.vocabulary)
    if args.prompt_samples:
        benchmark = evaluate_prompts(sample, judge, args.prompt_samples, refusal(pipe, options, args))
        result["prompts"] = {**benchmark, "summary": prompt_summary(benchmark)}
    result["seconds"] = time.perf_counter() - t0
    print(result_tables(result), flush=True)
    if styles is not None:
        print(style_tables(result["styles"], styles.vocabulary), flush=True)
    if args.prompt_samples:
        print(prompt_tables(result["prompts"]), flush=True)
    return result, picture


def refusal(pipe: Text2Digit, options: SamplingOptions, args) -> Callable[[str], str | None]:
    """The pipeline's one-line answer to a prompt it will not draw with ``options``, or None when it draws it."""

    def answer(prompt: str) -> str | None:
        try:
            pipe.check(Request((prompt,), options=options, unknown_words=args.unknown_words))
        except InvalidRequest as err:
            return str(err)
        return None

    return answer


def main() -> None:
    start = time.perf_counter()
    args = parse_args(sys.argv[1:])
    device = pick_device(args.device)
    args.bf16 = use_bf16(args.precision, device)
    path = find_model(args.checkpoint, args.output_dir)
    with writable_folder(results_dir(path), "the results go beside the checkpoint, but"):
        evaluate(args, path, device, start)


def results_dir(checkpoint: Path) -> Path:
    """Beside the checkpoint; the shipped models' results go to outputs/pretrained/, not into the repository."""
    return SHIPPED_RESULTS if checkpoint.resolve().parent == PRETRAINED_DIR else checkpoint.parent


def evaluate(args, path: Path, device: torch.device, start: float) -> None:
    """Sample, score and report ``path``'s model at every guidance scale asked for."""
    pipe = Text2Digit.from_checkpoint(path, str(device), args.precision, guide=args.guide_checkpoint)
    model = pipe.model
    args.options = [options.with_steps(pipe.default_steps) for options in args.options]  # the model's own default
    args.steps = args.options[0].steps
    with refused_as(flag):  # what only the model can tell (its timesteps; a distilled one's step counts)
        pipe.check(Request((canonical_prompt(7),), options=args.options[0]))
    args.sampler = pipe.sampled_with(args.options[0]).sampler  # a distilled model samples its own way
    record = judge_record()  # read now: a missing record fails before sampling, not after
    judge, reference = judge_and_reference(args.data_dir, device)
    vocabulary = model.vocabulary  # the captions the model was trained on
    styles = style_reference(args, vocabulary)
    plan = plan_prompts(args.num_samples, vocabulary.prompt_sets)
    print(
        f"{path} (epoch {model.epoch}): {args.sampler}, {args.steps} steps, seed {args.seed}, "
        f"{'bf16' if args.bf16 else 'fp32'} on {device}, "
        f"{args.num_samples} samples per digit per prompt set; judge accuracy on real test digits "
        f"{100 * reference.judge_accuracy:.2f}%\n"
    )

    results, pictures = [], {}
    for options in args.options:
        result, picture = evaluate_scale(pipe, options, plan, (judge, reference, styles), args)
        results.append(result)
        if picture is not None:
            pictures[output_path(args, path, f"_styles_cfg{options.guidance_scale:g}.png")] = picture

    if len(results) > 1:
        print(f"### guidance sweep\n\n{sweep_table(results)}\n")
        plot = plot_sweep(results, f"{path.name}: {args.sampler}, {args.steps} steps, seed {args.seed}")
        pictures[output_path(args, path, ".png")] = lambda png: atomic_write(png, lambda f: plot.save(f, format="PNG"))
    report = build_report(args, model, device, record, reference, results, time.perf_counter() - start)
    out = output_path(args, path, ".json")
    atomic_write(out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    print(f"wrote {out} ({report['wall_seconds']:.0f} s in all)")
    for picture, write in pictures.items():  # after the report: the figures matter more than the pictures
        write(picture)
        print(f"wrote {picture}")


if __name__ == "__main__":
    run_cli(main)
