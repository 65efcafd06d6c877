"""Train the text-conditioned MNIST diffusion model.

    python train.py                                  # one process, configs/mnist.yaml
    python train.py --config configs/cpu.yaml        # a laptop CPU
    torchrun --nproc_per_node=2 train.py             # DDP, one process per GPU (or CPU gloo)

Rank 0 logs, writes checkpoints and sample grids; every rank trains on a disjoint shard of
each epoch. The whole data set lives on the training device and text embeddings come from a
table computed once, so a step does no host work beyond launching kernels. The pieces live in
training/: the config (config.py), what a checkpoint holds (state.py), the loop (loop.py).
"""

from __future__ import annotations

import sys

import torch

from models.text_encoder import check_compatible
from runtime.errors import run_cli
from training.checkpoints import find_resume_checkpoint, load_checkpoint
from training.config import parse_train_args
from training.data import load_training_data
from training.distributed import setup_distributed, world_size_from_env
from training.loop import Trainer
from training.run_folder import RunFolder
from training.state import TrainingState, check_resumable
from training.stopping import StopSignals


def main() -> None:
    cfg, resume = parse_train_args(sys.argv[1:])
    cfg.batch_size = cfg.per_process_batch_size(world_size_from_env())
    procs = setup_distributed(cfg.device)
    stop = StopSignals(cfg.stop_check_every, procs.world_size, procs.device).install()
    if procs.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: find the fastest conv algorithms once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the fp32 left over

    # Every input is checked before the heavy work below.
    run = RunFolder(cfg.output_dir, procs.master)
    run.check_writable()
    resume_path = find_resume_checkpoint(resume, run.path)
    payload = load_checkpoint(resume_path) if resume_path else None
    if payload is not None:
        check_resumable(payload, cfg, procs.world_size, resume_path)

    data = load_training_data(cfg, procs)
    if payload is not None and procs.master:
        check_compatible(payload["text_encoder"], data.encoder_record)
    state = TrainingState(
        cfg,
        procs.device,
        procs.rank,
        procs.world_size,
        data.steps_per_epoch(cfg.batch_size, procs.world_size),
        data.encoder_record,
    )
    run.prepare()
    if payload is not None:
        state.load_state_dict(payload)
        state.guard.last_good = resume_path
        run.rewind_metrics(state.step)
        if procs.master:
            print(
                f"resumed from {resume_path} at step {state.step}: epoch {state.epoch}, batch {state.epoch_step}"
                + (" (training had finished)" if state.epoch > cfg.num_epochs else "")
            )

    trainer = Trainer(cfg, state, data, procs, run, stop)
    if procs.master:
        print(trainer.describe())
    trainer.train()
    procs.shut_down()


if __name__ == "__main__":
    run_cli(main)
