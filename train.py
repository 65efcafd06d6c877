"""Train the text-conditioned MNIST diffusion model.

    python train.py                                  # one process, configs/mnist.yaml
    python train.py --config configs/cpu.yaml        # a laptop CPU
    torchrun --nproc_per_node=2 train.py             # DDP, one process per GPU (or CPU gloo)

Rank 0 logs, writes checkpoints and sample grids; every rank trains on a disjoint shard of
each epoch. The whole data set lives on the training device and text embeddings come from a
table computed once, so a step does no host work beyond launching kernels. The pieces live in
training/: the config (config.py), what a checkpoint holds (state.py), the loop (loop.py), the
output folder (run_folder.py).
"""

from __future__ import annotations

import sys

import torch

from models.checkpoint import load_checkpoint
from models.text_encoder import check_compatible
from runtime.errors import StorageError, run_cli
from training.checkpoints import find_resume_checkpoint
from training.config import Launch, TrainConfig, parse_train_args
from training.data import load_training_data
from training.distributed import Processes, setup_distributed, world_size_from_env
from training.loop import Trainer
from training.run_folder import RunFolder
from training.state import TrainingState, check_resumable
from training.stopping import StopSignals


def main() -> None:
    cfg, launch = parse_train_args(sys.argv[1:])
    cfg.batch_size = cfg.per_process_batch_size(world_size_from_env())
    procs = setup_distributed(cfg.device)
    stop = StopSignals(cfg.stop_check_every, procs.world_size, procs.device).install()
    if procs.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: find the fastest conv algorithms once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the fp32 left over
    run = RunFolder(cfg.output_dir, procs.master)
    with run.claimed(fresh=launch.resume is None, overwrite=launch.overwrite):
        state, trainer = prepare(cfg, launch, procs, run, stop)
        try:
            trainer.train()
        except StorageError as err:
            last_good = state.guard.last_good or "none was written"
            err.hint = f"the last good checkpoint is {last_good}; free some space, then continue with --resume"
            raise
    procs.shut_down()


def prepare(
    cfg: TrainConfig, launch: Launch, procs: Processes, run: RunFolder, stop: StopSignals
) -> tuple[TrainingState, Trainer]:
    """Check every input (before the heavy work), load the data and build the state, resumed if asked."""
    resume_path = find_resume_checkpoint(launch.resume, run.path)
    payload = load_checkpoint(resume_path) if resume_path else None
    if payload is not None:
        check_resumable(payload, cfg, procs.world_size, resume_path)
    data = load_training_data(cfg, procs)
    if payload is not None and procs.master:
        check_compatible(payload["text_encoder"], data.encoder_record)
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size, procs.world_size)
    state = TrainingState(cfg, procs.device, procs.rank, procs.world_size, steps_per_epoch, data.encoder_record)
    run.start(fresh_after_auto=launch.resume == "auto" and payload is None)
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
    return state, trainer


if __name__ == "__main__":
    run_cli(main)
