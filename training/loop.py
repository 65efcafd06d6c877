"""The training loop: steps, logging, checkpoints, stop requests, and what each epoch ends with."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.captions import canonical_prompt
from data.images import save_grid, to_uint8
from data.shapes import IMAGE_SHAPE, NUM_DIGITS
from ddpm import GaussianDiffusion, generate
from evaluation.suite import evaluate_during_training
from models.checkpoint import checkpoint_path, save_checkpoint, step_checkpoint_path
from runtime import devices
from runtime.errors import EXIT_RESUMABLE
from training.checkpoints import prune_checkpoints
from training.config import TrainConfig
from training.data import TrainingData
from training.distributed import Processes, epoch_batches, ranks_in_sync
from training.run_folder import RunFolder
from training.state import TrainingState, memory_format
from training.stopping import StopSignals


class Trainer:
    """Trains a :class:`TrainingState` from where it stands to the last epoch."""

    def __init__(
        self,
        cfg: TrainConfig,
        state: TrainingState,
        data: TrainingData,
        procs: Processes,
        run: RunFolder,
        stop: StopSignals,
    ):
        self.cfg, self.state, self.data, self.procs, self.run, self.stop = cfg, state, data, procs, run, stop
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self.bf16 = devices.use_bf16(cfg.precision, procs.device)
        self.compiled = devices.use_compile(cfg.compile, procs.device)
        device = procs.device
        model = (
            DDP(
                state.net,
                device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=100,
                gradient_as_bucket_view=True,
            )
            if procs.world_size > 1
            else state.net
        )
        self.forward = torch.compile(model) if self.compiled else model
        self.images_per_step = cfg.batch_size * procs.world_size

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.state.net.parameters())
        record = self.data.encoder_record
        return (
            f"device {self.procs.device}, world size {self.procs.world_size}, {n_params / 1e6:.2f}M parameters, "
            f"{self.state.steps_per_epoch} steps/epoch of {self.cfg.batch_size}x{self.procs.world_size} images, "
            f"bf16 {self.bf16}, compile {self.compiled}, text encoder {record['weights']} ({record['source']})"
        )

    def train(self) -> None:
        for epoch in range(self.state.epoch, self.cfg.num_epochs + 1):
            self.state.begin_epoch(epoch)
            started, first_step = time.perf_counter(), self.state.step
            stopping = self.train_epoch()
            self.end_epoch(stopping, time.perf_counter() - started, self.state.step - first_step)

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the images ``batch`` indexes; returns the loss (no host sync)."""
        cfg, state, data, device = self.cfg, self.state, self.data, self.procs.device
        gen = state.generator
        x0 = (data.images[batch].float() / 127.5 - 1).unsqueeze(1).contiguous(memory_format=memory_format(cfg))
        b = len(batch)
        caption = data.draw_captions(batch, gen)
        drop = torch.rand(b, device=device, generator=gen) < cfg.cond_drop_prob
        context = data.prompt_table[torch.where(drop, 0, caption)]
        t = self.diffusion.sample_timesteps(b, gen, device, **cfg.noise_levels())
        noise = torch.randn(x0.shape, device=device, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.forward(self.diffusion.q_sample(x0, t, noise), t, context)
        loss = self.diffusion.training_loss(output, x0, t, noise, cfg.min_snr_gamma)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(state.net.parameters(), cfg.grad_clip or math.inf)
        if state.guard.admit(grad_norm, state.step + 1):
            state.optimizer.step()
        state.scheduler.step()
        return loss.detach()

    def train_epoch(self) -> bool:
        """The rest of the state's epoch; whether a stop signal asked training to end after it."""
        cfg, state, procs = self.cfg, self.state, self.procs
        shard = epoch_batches(
            len(self.data.images), cfg.seed, state.epoch, procs.rank, procs.world_size, cfg.batch_size
        ).to(procs.device)
        state.net.train()
        window = (time.perf_counter(), state.step)  # when and at which step the logging window began
        progress = tqdm(
            total=state.steps_per_epoch,
            initial=state.epoch_step,
            desc=f"epoch {state.epoch}/{cfg.num_epochs}",
            disable=not procs.master,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        stopping = False
        with progress as bar:  # closed (ending its line) on an error too, so the error line stands alone
            while not state.epoch_done:
                state.losses.add(self.train_step(shard[state.epoch_step]))
                state.step += 1
                state.epoch_step += 1
                if state.ema is not None:
                    state.ema.update(state.net)
                if state.step % cfg.log_every == 0 or state.epoch_done:
                    window = self.log_window(window, bar)
                bar.update(1)
                stopping = self.stop.should_stop(state.step)
                if not state.epoch_done and (stopping or self.checkpoint_due(epoch_end=False)):
                    path = self.save()
                    if stopping:
                        bar.close()
                        self.exit_resumable(path)
        return stopping

    def log_window(self, window: tuple[float, int], bar: tqdm) -> tuple[float, int]:
        """Check for a non-finite step (on every rank, so that all stop together), log the window's mean
        loss and speed (rank 0: with the guard, the only host syncs), and start the next window."""
        self.state.guard.check()
        if self.procs.master:
            started, first_step = window
            mean_loss = self.state.losses.take_window_mean()
            rate = (self.state.step - first_step) * self.images_per_step / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
            self.run.log(
                {
                    "step": self.state.step,
                    "epoch": self.state.epoch,
                    "loss": mean_loss,
                    "lr": self.state.scheduler.get_last_lr()[0],
                    "img_per_s": rate,
                }
            )
        return time.perf_counter(), self.state.step

    # ------------------------------------------------------------------ checkpoints and stopping
    def checkpoint_due(self, epoch_end: bool) -> bool:
        """Every ``checkpoint_every_steps`` steps, and at the end of every ``checkpoint_every``-th and the last
        epoch."""
        cfg, epoch = self.cfg, self.state.epoch
        if cfg.checkpoint_every_steps and self.state.step % cfg.checkpoint_every_steps == 0:
            return True
        return epoch_end and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.num_epochs)

    def save(self) -> Path:
        """Checkpoint the state, named by the epoch at its end and by the step mid-epoch. Every rank calls it
        (the random states are gathered); rank 0 writes, then prunes."""
        state = self.state
        state.guard.check()  # never save weights that a non-finite step has touched
        payload = state.state_dict()
        output_dir = self.run.path
        path = (
            checkpoint_path(output_dir, state.epoch)
            if state.epoch_done
            else step_checkpoint_path(output_dir, state.step)
        )
        if self.procs.master:
            save_checkpoint(payload, path)
            prune_checkpoints(output_dir, self.cfg.keep_last)
        state.guard.last_good = path
        return path

    def exit_resumable(self, checkpoint: Path) -> NoReturn:
        """After the checkpoint a stop signal asked for, every rank exits together with EXIT_RESUMABLE."""
        step = self.state.step
        self.run.log({"step": step, "event": "stopped", "signal": self.stop.signal_name, "checkpoint": str(checkpoint)})
        if self.procs.master:
            print(
                f"stopped by {self.stop.signal_name} after step {step}; {checkpoint} holds the state: "
                "continue with --resume",
                file=sys.stderr,
            )
        self.procs.shut_down()  # rank 0 has written the checkpoint before any rank exits (torchrun then kills the rest)
        sys.exit(EXIT_RESUMABLE)

    # ------------------------------------------------------------------ the end of an epoch
    def end_epoch(self, stopping: bool, seconds: float, steps: int) -> None:
        """Checkpoint if due, log the epoch, stop if asked to, then (rank 0) the sample grid and evaluation."""
        cfg, state = self.cfg, self.state
        epoch = state.epoch
        path = self.save() if stopping or self.checkpoint_due(epoch_end=True) else None
        in_sync = ranks_in_sync(state.net)
        if self.procs.master:
            epoch_loss = state.losses.epoch_sum.item() / state.steps_per_epoch
            self.run.log(
                {
                    "step": state.step,
                    "epoch": epoch,
                    "epoch_loss": epoch_loss,
                    "epoch_seconds": seconds,
                    "world_size": self.procs.world_size,
                    "ranks_in_sync": in_sync,
                }
            )
            print(
                f"epoch {epoch}: loss {epoch_loss:.4f}, {seconds:.1f} s, "
                f"{steps * self.images_per_step / seconds:.0f} img/s"
            )
        if stopping and epoch < cfg.num_epochs:
            self.exit_resumable(path)
        if not self.procs.master:
            return
        if epoch % cfg.sample_every == 0 or epoch == cfg.num_epochs:
            self.write_samples(self.run.sample_grid(epoch))
        if cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch == cfg.num_epochs):
            scores = evaluate_during_training(
                self.sample, self.data.captions.vocabulary.templates, cfg.eval_samples, cfg.data_dir, self.procs.device
            )
            self.run.log({"epoch": epoch, "step": state.step, **scores})
            print(
                f"epoch {epoch}: judge accuracy {scores['eval_accuracy']:.3f}, FMD {scores['eval_fmd']:.2f} "
                f"(floor {scores['eval_fmd_floor']:.2f}), {scores['eval_seconds']:.1f} s"
            )

    def sample(self, prompts: list[str]) -> torch.Tensor:
        """One image in [-1, 1] per prompt (each a caption of the prompt table), sampled from the EMA weights
        with the config's sampling options and seed: [len(prompts), 1, 28, 28]."""
        table = self.data.prompt_table
        rows = torch.tensor([self.data.captions.row_of(p) for p in prompts], device=table.device)
        return generate(
            self.state.ema.shadow,
            self.diffusion,
            table[rows],
            table[:1],
            self.cfg.sampling_options(),
            image_shape=IMAGE_SHAPE,
            seed=self.cfg.seed,
            bf16=self.bf16,
        )

    def write_samples(self, path: Path) -> None:
        """A grid with one row per digit, prompted by the digit itself, sampled from the EMA weights."""
        n = self.cfg.samples_per_digit
        images = self.sample([canonical_prompt(d) for d in range(NUM_DIGITS) for _ in range(n)])
        grid = to_uint8(images).reshape(NUM_DIGITS, n, *IMAGE_SHAPE[1:])
        save_grid(list(grid), [f'"{canonical_prompt(d)}"' for d in range(NUM_DIGITS)], path)
        print(f"wrote {path}")
