"""Shared test setup: the repository root on sys.path, so tests import the scripts' modules, and
an untrained tiny checkpoint for the tests of the scripts that read one."""
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import TrainConfig  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402
from models.ema import EMA  # noqa: E402
from models.loading import unet_from_config  # noqa: E402
from models.text_encoder import build_text_encoder  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny UNet saved as train.py saves an epoch (its samples are noise)."""
    cfg = asdict(TrainConfig(widths=[16, 32], attention=[False, True], layers_per_block=1, head_dim=16,
                             text_encoder="random"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_epoch_0001.pt"
    save_checkpoint({"config": cfg, "ema": EMA(unet_from_config(cfg), 0.9).state_dict(), "epoch": 1,
                     "text_encoder": build_text_encoder("random", seed=0).record}, path)
    return path
