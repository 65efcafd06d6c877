"""Train the text-conditioned MNIST diffusion model.

    python train.py                                  # one process, configs/mnist.yaml
    python train.py --config configs/cpu.yaml        # a laptop CPU
    torchrun --nproc_per_node=2 train.py             # DDP, one process per GPU (or CPU gloo)

Rank 0 logs, writes checkpoints and sample grids; every rank trains on a disjoint shard of
each epoch. The whole data set lives on the training device and text embeddings come from a
table computed once, so a step does no host work beyond launching kernels.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import devices
from config import TrainConfig, parse_train_args
from data import EMPTY_PROMPT, canonical_prompt, load_mnist, training_prompts
from data.images import save_grid, to_uint8
from ddpm import GaussianDiffusion, generate
from errors import EXIT_RESUMABLE, UserError, run_cli
from evaluation.suite import evaluate_during_training
from fileio import check_writable
from models.checkpoint import checkpoint_path, prune_checkpoints, save_checkpoint, step_checkpoint_path
from models.ema import EMA
from models.loading import diffusion_from_config, unet_from_config
from models.text_encoder import build_text_encoder, check_compatible
from resume import find_resume_checkpoint, gather_rng, load_resumable, restore_rng, resume_position, rewind_metrics
from stopping import NonFiniteGuard, StopSignals


# ----------------------------------------------------------------------------- setup
def setup_distributed(device_flag: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; a plain run is rank 0 of 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = devices.pick_device(device_flag)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else device.index or 0)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def prompt_table(cfg: TrainConfig, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """Text tokens of every training prompt, computed once on rank 0 and broadcast.

    Returns (table [1 + P, 8, 512] with the empty prompt in row 0, rows [10, K] mapping
    (digit, template) to a table row, the encoder's record on rank 0).
    """
    pairs = training_prompts()
    per_digit = len(pairs) // 10
    rows = torch.arange(1, 1 + len(pairs), device=device).reshape(10, per_digit)
    table = torch.empty(1 + len(pairs), 8, 512, device=device)
    record = None
    if rank == 0:
        encoder = build_text_encoder(cfg.text_encoder, seed=cfg.text_encoder_seed, device=device)
        table, _ = encoder.encode([EMPTY_PROMPT] + [p for p, _ in pairs])
        record = encoder.record
        del encoder
    if dist.is_initialized():
        dist.broadcast(table, src=0)
    return table, rows, record


def epoch_batches(num_images: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> torch.Tensor:
    """This rank's image indices for one epoch, [steps, batch_size].

    One permutation per (seed, epoch), the same on every rank, dealt out round-robin: the
    ranks' shards are disjoint, and the last images that cannot fill a step on every rank
    are dropped (a different set each epoch).
    """
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 1009 + epoch))
    steps = num_images // (batch_size * world_size)
    return order[rank::world_size][: steps * batch_size].view(steps, batch_size)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then cosine decay to 10% of the peak (or constant)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def ranks_in_sync(net: torch.nn.Module) -> bool:
    """Whether every rank holds bitwise the same weights, as DDP promises: one small all_gather
    of per-tensor float64 sums, once an epoch."""
    fingerprint = torch.stack([p.detach().double().sum() for p in net.parameters()])
    gathered = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# ----------------------------------------------------------------------------- outputs
def write_samples(cfg: TrainConfig, ema: EMA, diffusion: GaussianDiffusion, table: torch.Tensor,
                  rows: torch.Tensor, path: Path, use_bf16: bool) -> None:
    """A grid with one row per digit 0-9, prompted by the digit itself, sampled from the EMA weights."""
    n = cfg.samples_per_digit
    digit_rows = rows[:, 0].repeat_interleave(n)  # template 0 is "{d}", the canonical prompt
    images = generate(ema.shadow, diffusion, table[digit_rows], table[:1], sampler=cfg.sampler,
                      steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed, bf16=use_bf16)
    grid = to_uint8(images).reshape(10, n, 28, 28)
    save_grid(list(grid), [f'"{canonical_prompt(d)}"' for d in range(10)], path)


def log_metrics(output_dir: Path, record: dict) -> None:
    with open(output_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def checkpoint_due(cfg: TrainConfig, epoch: int, step: int, epoch_end: bool) -> bool:
    """Every ``checkpoint_every_steps`` steps, and at the end of every ``checkpoint_every``-th and the last epoch."""
    if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
        return True
    return epoch_end and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.num_epochs)


def exit_resumable(stop: StopSignals, checkpoint: Path, output_dir: Path, step: int, master: bool) -> NoReturn:
    """After the checkpoint a stop signal asked for, every rank exits together with EXIT_RESUMABLE."""
    if master:
        log_metrics(output_dir, {"step": step, "event": "stopped", "signal": stop.signal_name,
                                 "checkpoint": str(checkpoint)})
        print(f"stopped by {stop.signal_name} after step {step}; {checkpoint} holds the state: "
              "continue with --resume", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the checkpoint before any rank exits (torchrun then kills the rest)
        dist.destroy_process_group()
    sys.exit(EXIT_RESUMABLE)


# ----------------------------------------------------------------------------- training
def main() -> None:
    cfg, resume = parse_train_args(sys.argv[1:])
    cfg.batch_size = cfg.per_process_batch_size(int(os.environ.get("WORLD_SIZE", 1)))
    rank, world_size, device = setup_distributed(cfg.device)
    stop = StopSignals(cfg.stop_check_every, world_size, device).install()
    master = rank == 0
    torch.manual_seed(cfg.seed)
    use_bf16 = devices.use_bf16(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: find the fastest conv algorithms once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the fp32 left over
    output_dir = Path(cfg.output_dir)
    if master:
        check_writable(output_dir, "--output_dir")  # created below, once every input has been checked
    resume_path = find_resume_checkpoint(resume, output_dir)  # checked before the heavy work below
    state = load_resumable(resume_path, asdict(cfg), world_size) if resume_path else None

    # Data: the whole set on the device as uint8; batches are gathered there.
    if not master and world_size > 1:
        dist.barrier()  # rank 0 fetches and caches MNIST first
    mnist = load_mnist(cfg.data_dir)
    if master and world_size > 1:
        dist.barrier()
    images = torch.from_numpy(mnist.train_images).to(device)
    labels = torch.from_numpy(mnist.train_labels).to(device).long()
    if cfg.train_subset:
        images, labels = images[:cfg.train_subset], labels[:cfg.train_subset]
    steps_per_epoch = len(images) // (cfg.batch_size * world_size)
    if steps_per_epoch == 0:
        raise UserError(f"{len(images)} images cannot fill one step of batch {cfg.batch_size} x world size "
                        f"{world_size}; lower --batch_size")
    table, prompt_rows, encoder_record = prompt_table(cfg, rank, device)
    if state is not None and master:
        check_compatible(state["text_encoder"], encoder_record)

    diffusion = diffusion_from_config(asdict(cfg))
    net = unet_from_config(asdict(cfg)).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    ema = EMA(net, cfg.ema_decay) if master else None
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=True)  # one kernel for all tensors: on the CPU too (4x the for-loop's speed)
    total_steps = cfg.num_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + rank)

    if master:
        (output_dir / "samples").mkdir(parents=True, exist_ok=True)
    start_epoch, first_batch, step = 1, 0, 0
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], rank, world_size, generator)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        (start_epoch, first_batch), step = resume_position(state), state["step"]
        if master:
            rewind_metrics(output_dir, step)
            print(f"resumed from {resume_path} at step {step}: epoch {start_epoch}, batch {first_batch}"
                  + (" (training had finished)" if start_epoch > cfg.num_epochs else ""))
    guard = NonFiniteGuard(cfg.max_bad_steps, step, state["bad_steps"] if state else 0, device)
    guard.last_good = resume_path

    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=100, gradient_as_bucket_view=True) if world_size > 1 else net
    compiled = devices.use_compile(cfg.compile, device)
    forward = torch.compile(model) if compiled else model
    if master:
        n_params = sum(p.numel() for p in net.parameters())
        print(f"device {device}, world size {world_size}, {n_params / 1e6:.2f}M parameters, "
              f"{steps_per_epoch} steps/epoch of {cfg.batch_size}x{world_size} images, bf16 {use_bf16}, "
              f"compile {compiled}, text encoder {encoder_record['weights']} ({encoder_record['source']})")

    def train_step(batch: torch.Tensor) -> torch.Tensor:
        x0 = (images[batch].float() / 127.5 - 1).unsqueeze(1).contiguous(memory_format=memory_format)
        b = len(batch)
        template = torch.randint(prompt_rows.shape[1], (b,), device=device, generator=generator)
        drop = torch.rand(b, device=device, generator=generator) < cfg.cond_drop_prob
        context = table[torch.where(drop, 0, prompt_rows[labels[batch], template])]
        t = torch.randint(cfg.num_train_timesteps, (b,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        x_t = diffusion.q_sample(x0, t, noise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            output = forward(x_t, t, context)
        loss = diffusion.training_loss(output, x0, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip or math.inf)
        if guard.admit(grad_norm):
            optimizer.step()
        scheduler.step()
        return loss.detach()

    def save(epoch: int, batches_done: int) -> Path:
        """Checkpoint the state after ``batches_done`` batches of ``epoch``: named by the epoch at its end, by
        the step mid-epoch. Every rank calls it (the random states are gathered); rank 0 writes, then prunes."""
        guard.check()  # never save weights that a non-finite step has touched
        rng = gather_rng(generator, world_size)
        epoch_end = batches_done == steps_per_epoch
        path = checkpoint_path(output_dir, epoch) if epoch_end else step_checkpoint_path(output_dir, step)
        if master:
            save_checkpoint({
                "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "epoch_step": batches_done,
                "steps_per_epoch": steps_per_epoch, "step": step, "world_size": world_size, "rng": rng,
                "loss_sums": torch.stack([loss_sum, window_sum]).cpu(), "window_steps": window_steps,
                "bad_steps": guard.skipped, "config": asdict(cfg), "text_encoder": encoder_record,
            }, path)
            prune_checkpoints(output_dir, cfg.keep_last)
        guard.last_good = path
        return path

    for epoch in range(start_epoch, cfg.num_epochs + 1):
        shard = epoch_batches(len(images), cfg.seed, epoch, rank, world_size, cfg.batch_size).to(device)
        net.train()
        loss_sum, window_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        window_steps = 0
        if first_batch:  # resumed mid-epoch: the running sums of the steps before
            loss_sum, window_sum = (s.to(device) for s in state["loss_sums"])
            window_steps = state["window_steps"]
        t_epoch = t_window = time.perf_counter()
        timed_from = epoch_from = step  # a resumed epoch times only the steps it takes
        bar = tqdm(total=steps_per_epoch, initial=first_batch, desc=f"epoch {epoch}/{cfg.num_epochs}",
                   disable=not master, dynamic_ncols=True, mininterval=1.0)
        for i in range(first_batch, steps_per_epoch):
            loss = train_step(shard[i])
            step += 1
            loss_sum += loss
            window_sum += loss
            window_steps += 1
            if ema is not None:
                ema.update(net)
            log_step = step % cfg.log_every == 0 or i == steps_per_epoch - 1
            if log_step:
                guard.check()  # on every rank, so that all stop together
            if master and log_step:
                mean_loss = window_sum.item() / window_steps  # with guard.check, the only host syncs
                rate = (step - timed_from) * cfg.batch_size * world_size / (time.perf_counter() - t_window)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
                log_metrics(output_dir, {"step": step, "epoch": epoch, "loss": mean_loss,
                                         "lr": scheduler.get_last_lr()[0], "img_per_s": rate})
                window_sum.zero_()
                window_steps = 0
                t_window, timed_from = time.perf_counter(), step
            bar.update(1)
            stopping = stop.should_stop(step)
            if i + 1 < steps_per_epoch and (stopping or checkpoint_due(cfg, epoch, step, epoch_end=False)):
                path = save(epoch, i + 1)
                if stopping:
                    exit_resumable(stop, path, output_dir, step, master)
        first_batch = 0
        bar.close()
        if stopping or checkpoint_due(cfg, epoch, step, epoch_end=True):
            path = save(epoch, steps_per_epoch)
        in_sync = ranks_in_sync(net) if world_size > 1 else True
        if master:
            epoch_time = time.perf_counter() - t_epoch
            epoch_loss = loss_sum.item() / steps_per_epoch
            log_metrics(output_dir, {"step": step, "epoch": epoch, "epoch_loss": epoch_loss,
                                     "epoch_seconds": epoch_time, "world_size": world_size, "ranks_in_sync": in_sync})
            print(f"epoch {epoch}: loss {epoch_loss:.4f}, {epoch_time:.1f} s, "
                  f"{(step - epoch_from) * cfg.batch_size * world_size / epoch_time:.0f} img/s")
        if stopping and epoch < cfg.num_epochs:
            exit_resumable(stop, path, output_dir, step, master)
        if not master:
            continue
        if epoch % cfg.sample_every == 0 or epoch == cfg.num_epochs:
            path = output_dir / "samples" / f"samples_epoch_{epoch:04d}.png"
            write_samples(cfg, ema, diffusion, table, prompt_rows, path, use_bf16)
            print(f"wrote {path}")
        if cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch == cfg.num_epochs):
            scores = evaluate_during_training(cfg, ema.shadow, diffusion, table, prompt_rows, use_bf16)
            log_metrics(output_dir, {"epoch": epoch, "step": step, **scores})
            print(f"epoch {epoch}: judge accuracy {scores['eval_accuracy']:.3f}, FMD {scores['eval_fmd']:.2f} "
                  f"(floor {scores['eval_fmd_floor']:.2f}), {scores['eval_seconds']:.1f} s")

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
