"""Train the MNIST judge on real MNIST, on a CPU, in a few minutes.

    python -m evaluation.train_judge                 # writes evaluation/judge.pt and judge.json

Seeded; light random-affine augmentation; AdamW with a one-cycle learning rate. The weights are
stored in float16 and the test accuracy recorded in judge.json is measured on the stored weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data.mnist import load_mnist
from evaluation.judge import JUDGE_PATH, Judge, judge_images, judge_input, load_judge
from runtime.errors import UserError, run_cli
from runtime.files import atomic_write
from runtime.flags import CliParser, require_positive

MAX_ROTATION_DEG, MAX_SCALE, MAX_SHIFT_PX = 10.0, 0.1, 2.0


def parse_args(argv: list[str]):
    p = CliParser(prog="python -m evaluation.train_judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=3e-3, help="peak of the one-cycle schedule")
    p.add_argument("--weight_decay", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", help="folder holding MNIST (default: the cache)")
    p.add_argument("--out", type=Path, default=JUDGE_PATH, help="weights file; the record goes beside it as .json")
    args = p.parse_args(argv)
    require_positive(args, ("epochs", "batch_size"))
    if not args.learning_rate > 0:
        raise UserError(f"--learning_rate must be > 0, got {args.learning_rate}")
    return args


def random_affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate, scale and shift each image of [N, 1, 28, 28] in [-1, 1] a little; background stays -1."""
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * MAX_SCALE
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * MAX_SHIFT_PX * 2 / x.shape[-1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding = black background


def train(judge: Judge, images: torch.Tensor, labels: torch.Tensor, args) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(images) // args.batch_size
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.learning_rate, total_steps=args.epochs * steps_per_epoch
    )
    judge.train()
    for epoch in range(1, args.epochs + 1):
        start, loss_sum, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(images), generator=generator)
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size : (i + 1) * args.batch_size]
            logits = judge(random_affine(judge_input(images[batch]), generator))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == labels[batch]).sum().item()
        seen = steps_per_epoch * args.batch_size
        print(
            f"epoch {epoch}/{args.epochs}: loss {loss_sum / steps_per_epoch:.4f}, "
            f"train accuracy {correct / seen:.4f} (augmented), {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )


def main() -> None:
    args = parse_args(sys.argv[1:])
    torch.manual_seed(args.seed)
    mnist = load_mnist(args.data_dir)
    judge = Judge()
    load, start = os.getloadavg()[0], time.perf_counter()
    train(judge, torch.from_numpy(mnist.train_images), torch.from_numpy(mnist.train_labels).long(), args)
    seconds = time.perf_counter() - start
    half = {k: v.half() if v.is_floating_point() else v for k, v in judge.state_dict().items()}
    atomic_write(args.out, lambda f: torch.save(half, f))

    logits, _ = judge_images(load_judge(args.out), mnist.test_images)  # the stored float16 weights
    errors = int((logits.argmax(1) != mnist.test_labels).sum())
    record = {
        "test_accuracy": 1 - errors / len(mnist.test_labels),
        "test_errors": errors,
        "weights_sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "parameters": sum(p.numel() for p in judge.parameters()),
        "storage": "float16 state dict",
        "training": {
            "command": f"python -m evaluation.train_judge --epochs {args.epochs} --batch_size {args.batch_size} "
            f"--learning_rate {args.learning_rate} --weight_decay {args.weight_decay} --seed {args.seed}",
            "data": "MNIST training set (60,000 real images); no generated images",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "optimizer": f"AdamW, one-cycle learning rate peaking at {args.learning_rate}, "
            f"weight decay {args.weight_decay}",
            "augmentation": f"random affine: rotation +-{MAX_ROTATION_DEG:g} deg, scale +-{MAX_SCALE:g}, "
            f"shift +-{MAX_SHIFT_PX:g} px",
            "seconds": round(seconds, 1),
            "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"load average {load:.1f} at the start (other jobs slow it down)",
            "torch": torch.__version__,
        },
    }
    atomic_write(args.out.with_suffix(".json"), lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
    print(
        f"test accuracy {record['test_accuracy']:.4f} ({errors} errors) after {seconds:.0f} s of training; "
        f"wrote {args.out} and {args.out.with_suffix('.json')}"
    )


if __name__ == "__main__":
    run_cli(main)
