"""Fill the caches a training job reads, once, on a machine with internet (a cluster's login node).

    python prefetch.py                # MNIST and the OpenAI CLIP ViT-B/32 weights
    python prefetch.py --skip_clip    # MNIST only (for --text_encoder random)

MNIST goes to $MNIST_CACHE_DIR (default ~/.cache/text2digit), md5-checked; the CLIP weights go to
the Hugging Face cache ($HF_HOME, default ~/.cache/huggingface). Compute nodes that see the same
folders then train offline: slurm/train.sbatch sets HF_HUB_OFFLINE=1 and check_environment.py
fails fast, naming what is missing.
"""

from __future__ import annotations

import os
import sys

from huggingface_hub.constants import HF_HUB_CACHE

from data.mnist import load_mnist, mnist_cache_dir
from models.text_encoder import build_text_encoder
from runtime.errors import UserError, run_cli
from runtime.flags import CliParser


def main() -> None:
    parser = CliParser(prog="prefetch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip_clip", action="store_true", help="fetch MNIST only")
    args = parser.parse_args(sys.argv[1:])
    mnist = load_mnist()
    print(f"MNIST: {len(mnist.train_images)} + {len(mnist.test_images)} images in {mnist_cache_dir()} (md5 verified)")
    if args.skip_clip:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(
            "HF_HUB_OFFLINE is set, so the CLIP weights cannot be downloaded; "
            "unset it (env -u HF_HUB_OFFLINE python prefetch.py) on a machine with internet"
        )
    encoder = build_text_encoder("openai")
    print(f"CLIP ViT-B/32 text weights: {encoder.source}, in {HF_HUB_CACHE}")


if __name__ == "__main__":
    run_cli(main)
