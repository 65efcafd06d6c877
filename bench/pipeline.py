"""Pipeline benchmark: seconds for 100 digits through ``Text2Digit`` (prompts read and encoded, sampled,
made uint8), the teacher at its defaults and its distilled student (the shipped model) at each of its step
counts, in one run. A benchmark, not a test.

    python -m bench.pipeline                      # models/pretrained/fast.pt and its teacher, fp32, 2 threads
    python -m bench.pipeline --repeats 5 --threads 1

Each call asks for ten digits of each of ten prompts, one per digit. "new prompts" are ten the pipeline
has not encoded before (the text tower runs on all ten, as in a fresh process); "cached prompts" are the
ten of the call before, whose tokens ``TextEncoder.tokens_of`` remembers. Every time is the median of
``--repeats`` calls, after one warm-up call per model.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from data.captions import caption_set
from data.prompts import named
from data.shapes import NUM_DIGITS
from models.checkpoint import SHIPPED, TEACHER
from runtime.devices import PRECISION_HELP, PRECISIONS, cpu_kind
from runtime.errors import UserError, run_cli
from runtime.flags import CliParser
from text2digit import Text2Digit, make_request

PER_PROMPT = 10  # digits of each of the ten prompts: 100 a call


def parse_args(argv: list[str]):
    p = CliParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=TEACHER, help="the guided model, sampled at its defaults")
    p.add_argument("--student", type=Path, default=SHIPPED, help="its distilled student")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (the median is shown)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the issue's setting: 2)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        raise UserError(f"--repeats and --threads must be at least 1, got {args.repeats} and {args.threads}")
    return args


def fresh_prompt_sets(pipe: Text2Digit) -> Iterator[list[str]]:
    """Sets of ten training captions, one per digit, none read (``Text2Digit.reader``) as an earlier one was:
    each set is new to the text encoder's cache."""
    reader = pipe.reader(make_request("7"))
    by_digit: list[list[str]] = [[] for _ in range(NUM_DIGITS)]
    seen: set[str] = set()
    for prompt in caption_set(pipe.model.vocabulary).prompts:
        digit, read = named(prompt).digit, reader.read(prompt)
        if digit is not None and read not in seen:
            seen.add(read)
            by_digit[digit].append(prompt)
    yield from (list(prompts) for prompts in zip(*by_digit))


def seconds(pipe: Text2Digit, prompts: list[str], **options) -> float:
    start = time.perf_counter()
    pipe(prompts, num_samples=PER_PROMPT, seed=0, **options)
    return time.perf_counter() - start


def passes_per_digit(pipe: Text2Digit, **options) -> int:
    """Network passes one digit costs, counted on a one-digit call (which also warms the model up): a guided
    step counts two, its halves batched together."""
    rows = []
    hook = pipe.model.net.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    try:
        pipe(["7"], num_samples=1, **options)
    finally:
        hook.remove()
    return sum(rows)


def median_row(name: str, passes: int, calls: list[tuple[float, float]]) -> str:
    new, cached = (statistics.median(column) for column in zip(*calls))
    return f"| {name} | {passes} | {new:.3f} | {cached:.3f} |"


def main() -> None:
    args = parse_args(sys.argv[1:])
    torch.set_num_threads(args.threads)
    teacher = Text2Digit.from_checkpoint(args.checkpoint, "cpu", args.precision)
    student = Text2Digit.from_checkpoint(args.student, "cpu", args.precision)
    if not student.model.distillation:
        raise UserError(f"--student {args.student} is not a distilled model; make one with distill.py")
    prompt_sets = fresh_prompt_sets(teacher)
    rows = []
    for pipe, steps in [(teacher, None), *((student, n) for n in student.model.distillation["student_steps"])]:
        options = {} if steps is None else {"steps": steps}
        passes = passes_per_digit(pipe, **options)
        calls = []
        for _ in range(args.repeats):
            prompts = next(prompt_sets)
            calls.append((seconds(pipe, prompts, **options), seconds(pipe, prompts, **options)))
        name = f"{args.checkpoint.name}, its defaults" if steps is None else f"{args.student.name}, {steps} steps"
        rows.append(median_row(name, passes, calls))
    print(f"100 digits through the pipeline, {args.precision}, {args.threads} threads, {cpu_kind()} CPU")
    print("\n| model | network passes | s, new prompts | s, cached prompts |\n|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    run_cli(main)
