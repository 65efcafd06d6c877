"""Distil the guided teacher into a student that samples in 1, 2 or 4 steps, guidance folded in.

    python distill.py                                   # models/pretrained/mnist.pt into a cpu.pt-sized student
    python distill.py --resume                          # continue after a stop or a kill
    python sample.py --checkpoint outputs/fast/checkpoints/<newest>.pt --steps 4 --prompt "7"

First the teacher draws its guided trajectories (stage 1, in parts written one by one), then the
student learns to jump along them (stage 2, checkpointed). SIGINT or SIGTERM stops at the next part or
step with a checkpoint and exit status 75; ``--resume`` continues where it stopped, keeping every part
and step done. The method and its papers: ddpm/distillation.py; the stages: training/distillation.py.
"""

from __future__ import annotations

import sys

import torch

from ddpm.options import add_flags, flag_values, refused_as
from models.checkpoint import latest_checkpoint, load_checkpoint
from models.loading import load_trained_model
from runtime.devices import PRECISION_HELP, PRECISIONS, use_bf16
from runtime.errors import run_cli
from runtime.flags import CliParser
from training.distillation import DistillConfig, StudentTraining, make_trajectories, prompt_tokens
from training.run_folder import RunFolder
from training.stopping import StopSignals


def parse_args(argv: list[str]):
    p = CliParser(prog="distill.py", description=__doc__.split("\n\n")[0])
    add_flags(p, DistillConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    p.add_argument("--overwrite", action="store_true", help="move an earlier run in --output_dir aside")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    args = p.parse_args(argv)
    with refused_as(lambda name: f"--{name}"):
        return DistillConfig(**flag_values(args, DistillConfig)), args


def main() -> None:
    cfg, args = parse_args(sys.argv[1:])
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    stop = StopSignals(1, 1, device).install()
    run = RunFolder(cfg.output_dir, master=True)
    with run.claimed(fresh=not args.resume, overwrite=args.overwrite):
        teacher = load_trained_model(cfg.teacher, device)
        student = StudentTraining(cfg, teacher, load_trained_model(cfg.init, device), use_bf16(args.precision, device))
        newest = latest_checkpoint(cfg.output_dir) if args.resume else None
        if newest is not None:
            student.load(load_checkpoint(newest), newest)
            print(f"resumed from {newest} at step {student.step}")
        run.start(fresh_after_auto=False)
        table = prompt_tokens(teacher)
        data = make_trajectories(cfg, teacher, table, student.bf16, stop_requested=lambda: stop.received is not None)
        print(f"distilled: {student.train(data, table, stop_requested=lambda: stop.received is not None)}")


if __name__ == "__main__":
    run_cli(main)
