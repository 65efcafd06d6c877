"""Check that this machine can run a training job, before the job spends its allocation.

    python check_environment.py                                   # for configs/mnist.yaml
    python check_environment.py --config configs/tiny.yaml --output_dir /scratch/run1 --gpus 4

Takes every train.py flag, so it checks what that run would use: torch, CUDA, NCCL, the GPUs
visible (at least --gpus of them), MNIST in the cache or --data_dir (md5 of every file), the CLIP
text weights that would be loaded, and whether --output_dir is writable. It never downloads: a
compute node without internet is checked as it is, and a missing cache names the prefetch
command. Exit status 0 when every check passes, 1 naming the failed checks, 2 for a bad flag.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import constants as hub_constants

from data.mnist import IDX_FILES, WHEEL_NAME, load_mnist, mnist_cache_dir
from runtime.errors import UserError, run_cli
from runtime.files import prove_writable, remove_created
from runtime.flags import CliParser
from training.config import TrainConfig, parse_train_args

PREFETCH = "run `python prefetch.py` once on a machine with internet (a login node) sharing this file system"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_torch() -> Check:
    cuda = torch.version.cuda or "none (CPU-only build)"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else "none"
    return Check(
        "torch",
        True,
        f"{torch.__version__}, CUDA build {cuda}, NCCL {nccl}, "
        f"cuDNN {torch.backends.cudnn.version()}, python {platform.python_version()}",
    )


def check_gpus(required: int, device: str) -> Check:
    count = torch.cuda.device_count()
    if count < required or (device.startswith("cuda") and count == 0):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        return Check(
            "gpus",
            False,
            f"{count} visible (CUDA_VISIBLE_DEVICES={visible}), {max(required, 1)} needed; "
            "ask SLURM for them (--gpus-per-node) or train with --device cpu",
        )
    if count == 0:
        return Check("gpus", True, "none visible; training runs on the CPU (gloo)")
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return Check(
        "gpus", True, f"{count} x {', '.join(names)} ({memory:.0f} GiB each), bf16 {torch.cuda.is_bf16_supported()}"
    )


def check_distributed(device: str) -> Check:
    """The backend train.py picks for ``--device``: NCCL on GPUs, gloo on the CPU."""
    backends = [name for name, ok in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available())) if ok]
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    needed = "nccl" if cuda else "gloo"
    if needed not in backends:
        return Check(
            "distributed",
            False,
            f"backend {needed} is missing from this torch build (has: "
            f"{', '.join(backends) or 'none'}); install a torch wheel with {needed}",
        )
    return Check("distributed", True, f"backends {', '.join(backends)}; training would use {needed}")


def check_mnist(data_dir: str | None) -> Check:
    """MNIST as train.py would read it, every file md5-checked; a missing cache is reported, never fetched."""
    if data_dir is None:
        root = mnist_cache_dir()
        cached = all((root / "MNIST" / "raw" / name).is_file() for name in IDX_FILES.values())
        if not cached and not (root / WHEEL_NAME).is_file():
            return Check(
                "mnist",
                False,
                f"not in the cache {root} (MNIST_CACHE_DIR); {PREFETCH}, "
                "or pass --data_dir DIR holding the four idx files",
            )
    try:
        mnist = load_mnist(data_dir)
    except UserError as err:
        return Check("mnist", False, str(err))
    where = data_dir or mnist_cache_dir()
    return Check(
        "mnist",
        True,
        f"{where}: {len(mnist.train_images)} train and {len(mnist.test_images)} "
        "test images, md5 of every file verified",
    )


def check_text_encoder(weights: str, seed: int) -> Check:
    """Load the CLIP text weights train.py would use; with HF_HUB_OFFLINE=1, from local files only."""
    if weights == "random":
        return Check("clip weights", True, f"none needed: --text_encoder random (seed {seed})")
    from models.text_encoder import build_text_encoder  # open_clip and torchvision take seconds to import

    try:
        encoder = build_text_encoder("openai" if weights == "auto" else weights)
    except UserError as err:
        if weights not in ("auto", "openai"):
            return Check("clip weights", False, str(err))
        fallback = " (--text_encoder auto would fall back to a RANDOM encoder)" if weights == "auto" else ""
        return Check(
            "clip weights",
            False,
            f"OpenAI CLIP weights are not in the Hugging Face cache {hub_constants.HF_HUB_CACHE}"
            f"{fallback}; {PREFETCH}, or pass --text_encoder random",
        )
    return Check("clip weights", True, f"{encoder.kind} from {encoder.source}")


def check_output_dir(output_dir: str) -> Check:
    """Whether train.py could create --output_dir and write in it: proved by doing so, then undone."""
    try:
        remove_created(prove_writable(Path(output_dir), "--output_dir"))
    except UserError as err:
        return Check("output dir", False, str(err))
    return Check("output dir", True, f"{Path(output_dir).absolute()} is writable")


def run_checks(cfg: TrainConfig, gpus: int) -> list[Check]:
    return [
        check_torch(),
        check_gpus(gpus, cfg.device),
        check_distributed(cfg.device),
        check_mnist(cfg.data_dir),
        check_text_encoder(cfg.text_encoder, cfg.text_encoder_seed),
        check_output_dir(cfg.output_dir),
    ]


def main() -> None:
    parser = CliParser(prog="check_environment.py", description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs that must be visible (default 0)")
    args, train_flags = parser.parse_known_args(sys.argv[1:])
    cfg, _ = parse_train_args(train_flags)
    hub = os.environ.get("HF_HUB_OFFLINE", "unset")
    os.environ["HF_HUB_OFFLINE"] = "1"  # report what is here; never download
    print(f"environment check on {platform.node()} (HF_HUB_OFFLINE={hub})")
    checks = run_checks(cfg, args.gpus)
    for check in checks:
        print(f"  {'ok  ' if check.ok else 'FAIL'}  {check.name:<12} {check.detail}")
    failed = [check.name for check in checks if not check.ok]
    if failed:
        print(f"error: environment check failed on {platform.node()}: {', '.join(failed)} (see above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
