"""The MNIST judge: a small CNN whose logits grade conditional accuracy and whose penultimate
features feed the Fréchet MNIST distance.

It is trained on real MNIST only (``python -m evaluation.train_judge``); its weights ship as
``evaluation/judge.pt`` (float16) with the test accuracy they reached in ``evaluation/judge.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.shapes import NUM_DIGITS
from runtime.errors import UserError

JUDGE_PATH = Path(__file__).with_name("judge.pt")
FEATURE_DIM = 128
RETRAIN_HINT = "restore it from git or retrain it with python -m evaluation.train_judge"


def conv_block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """conv -> BatchNorm -> ReLU -> 2x2 max-pool."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Judge(nn.Module):
    """28x28 -> 14x14 @ 16 -> 7x7 @ 32 -> 3x3 @ 64 -> 128 features -> 10 logits (99k parameters).

    Input: [N, 1, 28, 28] images in [-1, 1] (see ``judge_input``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_block(1, 16, 5),
            conv_block(16, 32, 3),
            conv_block(32, 64, 3),
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, FEATURE_DIM, bias=False),
            nn.BatchNorm1d(FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, NUM_DIGITS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations [N, 128]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10]."""
        return self.head(self.body(x))


def judge_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 28, 28] in 0..255 -> float [N, 1, 28, 28] in [-1, 1].

    Real and generated digits both go through uint8 first, so they are judged alike.
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images [N, 28, 28], got {images.dtype} {tuple(images.shape)}")
    return (images.float() / 127.5 - 1).unsqueeze(1)


@torch.no_grad()
def judge_images(
    judge: Judge, images: np.ndarray | torch.Tensor, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [N, 10], features float64 [N, 128]) of uint8 images [N, 28, 28]."""
    device = next(judge.parameters()).device
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        x = judge_input(images[start : start + batch_size]).to(device)
        f = judge.features(x)
        logits.append(judge.head(f).float().cpu())
        features.append(f.double().cpu())
    return torch.cat(logits).numpy(), torch.cat(features).numpy()


def judge_record(path: Path = JUDGE_PATH) -> dict:
    """What ``train_judge`` wrote beside the weights: the test accuracy they reached and how."""
    record_path = path.with_suffix(".json")
    try:
        return json.loads(record_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the judge's record {record_path} ({err}); {RETRAIN_HINT}") from None


def load_judge(path: Path = JUDGE_PATH, device: torch.device | str = "cpu") -> Judge:
    """The judge in eval mode, float32, on ``device``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"judge weights {path} not found; {RETRAIN_HINT}") from None
    except Exception as err:  # torch raises many kinds for a torn or foreign file
        raise UserError(f"judge weights {path} are unreadable ({type(err).__name__}); {RETRAIN_HINT}") from None
    judge = Judge()
    try:
        judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (RuntimeError, AttributeError) as err:
        raise UserError(
            f"{path} does not hold judge weights ({str(err).splitlines()[0][:120]}); {RETRAIN_HINT}"
        ) from None
    return judge.to(device).eval().requires_grad_(False)
