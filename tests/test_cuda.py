"""What only a GPU can check (``pytest -m cuda``; ``make gpu-check`` runs them on a lent GPU): the network
computes on CUDA what it computes on the CPU, sampling on CUDA is reproducible image by image whatever the
batch, and train.py trains on CUDA (compiled, as it does there by default) a checkpoint the CPU samples.
Skipped where there is no CUDA device."""

import subprocess
import sys

import pytest
import torch

from ddpm import DEFAULT_SAMPLING
from models.checkpoint import latest_checkpoint
from tests.helpers import MICRO, PROCESS_ENV, ROOT, write_untrained_checkpoint
from text2digit import Request, Text2Digit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 matmuls and convolutions, so that CUDA and the CPU are compared on the same arithmetic."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_network_computes_on_cuda_what_it_computes_on_the_cpu(tmp_path):
    pipe = Text2Digit.from_checkpoint(write_untrained_checkpoint(tmp_path / "c.pt"), device="cpu")
    net = pipe.model.net
    x, t = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 500, 999])
    tokens, _ = pipe.model.encoder.encode(["7", "a thick 3", "", "8"])
    on_cpu = net(x, t, tokens.cpu())
    on_cuda = net.to("cuda")(x.cuda(), t.cuda(), tokens.cuda()).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


def test_sampling_on_cuda_is_reproducible_image_by_image_whatever_the_batch(tmp_path):
    pipe = Text2Digit.from_checkpoint(write_untrained_checkpoint(tmp_path / "c.pt"), device="cuda")
    request = Request(("7", "a thick 3"), 3, DEFAULT_SAMPLING.replace(steps=4), seed=5)
    whole, again, one_by_one = pipe.generate(request), pipe.generate(request), pipe.generate(request, batch_size=1)
    assert (whole == again).all()
    assert abs(whole.astype(int) - one_by_one.astype(int)).max() <= 1  # kernels may differ with the batch size


@pytest.mark.slow
def test_train_py_trains_on_cuda_a_checkpoint_the_cpu_samples(tmp_path):
    flags = list(MICRO)
    flags[flags.index("--device") + 1] = "cuda"
    cmd = [sys.executable, "train.py", *flags, "--compile", "auto", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=PROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = Text2Digit.from_checkpoint(latest_checkpoint(tmp_path), device="cpu")("7", num_samples=2, steps=2)
    assert images.shape == (1, 2, 28, 28)
