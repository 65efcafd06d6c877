"""What a training step reads: MNIST on the training device, and the text tokens of every training
prompt, computed once (no text-encoder pass per step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from data import EMPTY_PROMPT, load_mnist, training_prompts
from data.shapes import NUM_DIGITS, TEXT_DIM, TEXT_TOKENS
from models.text_encoder import build_text_encoder
from runtime.errors import UserError
from training.config import TrainConfig
from training.distributed import Processes


@dataclass(frozen=True)
class TrainingData:
    """The whole training set on the device as uint8 (batches are gathered there), and the prompt table."""

    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]
    prompt_table: torch.Tensor  # [1 + P, TEXT_TOKENS, TEXT_DIM]: the empty prompt in row 0, then every training prompt
    prompt_rows: torch.Tensor  # [NUM_DIGITS, K]: (digit, template) -> its row of prompt_table
    encoder_record: dict[str, Any] | None  # the text encoder's record (rank 0 only)

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        steps = len(self.images) // (batch_size * world_size)
        if steps == 0:
            raise UserError(
                f"{len(self.images)} images cannot fill one step of batch {batch_size} x world size "
                f"{world_size}; lower --batch_size"
            )
        return steps


def load_training_data(cfg: TrainConfig, procs: Processes) -> TrainingData:
    """MNIST's training set (``--train_subset`` of it) and the prompt table, on ``procs.device``."""
    if not procs.master:
        procs.barrier()  # rank 0 fetches and caches MNIST first
    mnist = load_mnist(cfg.data_dir)
    if procs.master:
        procs.barrier()
    images = torch.from_numpy(mnist.train_images).to(procs.device)
    labels = torch.from_numpy(mnist.train_labels).to(procs.device).long()
    if cfg.train_subset:
        images, labels = images[: cfg.train_subset], labels[: cfg.train_subset]
    table, rows, record = prompt_table(cfg, procs)
    return TrainingData(images, labels, table, rows, record)


def prompt_table(cfg: TrainConfig, procs: Processes) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """Text tokens of every training prompt, computed once on rank 0 and broadcast.

    Returns (table [1 + P, 8, 512] with the empty prompt in row 0, rows [10, K] mapping
    (digit, template) to a table row, the encoder's record on rank 0).
    """
    pairs = training_prompts()
    rows = torch.arange(1, 1 + len(pairs), device=procs.device).reshape(NUM_DIGITS, len(pairs) // NUM_DIGITS)
    table = torch.empty(1 + len(pairs), TEXT_TOKENS, TEXT_DIM, device=procs.device)
    record = None
    if procs.master:
        encoder = build_text_encoder(cfg.text_encoder, seed=cfg.text_encoder_seed, device=procs.device)
        table, _ = encoder.encode([EMPTY_PROMPT] + [p for p, _ in pairs])
        record = encoder.record
    if dist.is_initialized():
        dist.broadcast(table, src=0)
    return table, rows, record
