"""check_environment.py: each check finds what it is for, and the command exits 1 naming the failures."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import check_environment as ce
from data.mnist import IDX_FILES, mnist_cache_dir

ROOT = Path(__file__).resolve().parent.parent


def cache_copy(tmp_path):
    """A copy of the real MNIST cache (checked against the official md5 when it was written)."""
    raw = tmp_path / "cache" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES.values():
        shutil.copy(mnist_cache_dir() / "MNIST" / "raw" / name, raw / name)
    return tmp_path / "cache", raw


def test_mnist_cache_intact_missing_and_corrupt(tmp_path, monkeypatch):
    cache, raw = cache_copy(tmp_path)
    monkeypatch.setenv("MNIST_CACHE_DIR", str(cache))
    assert ce.check_mnist(None).ok
    data = bytearray((raw / IDX_FILES["train_labels"]).read_bytes())
    data[-1] = (data[-1] + 1) % 10  # still a valid label: only the checksum can tell
    (raw / IDX_FILES["train_labels"]).write_bytes(bytes(data))
    corrupt = ce.check_mnist(None)
    assert not corrupt.ok and "md5" in corrupt.detail
    monkeypatch.setenv("MNIST_CACHE_DIR", str(tmp_path / "empty"))
    missing = ce.check_mnist(None)
    assert not missing.ok and "prefetch.py" in missing.detail and str(tmp_path / "empty") in missing.detail


def test_clip_weights_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for weights in ("openai", "auto"):
        check = ce.check_text_encoder(weights, 0)
        assert not check.ok and "prefetch.py" in check.detail and "--text_encoder random" in check.detail
    assert "RANDOM" in ce.check_text_encoder("auto", 0).detail  # what auto would silently do instead
    assert not ce.check_text_encoder(str(tmp_path / "nope.pt"), 0).ok
    assert ce.check_text_encoder("random", 3).ok


def test_gpus_and_output_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert ce.check_gpus(0, "auto").ok and ce.check_gpus(0, "cpu").ok
    assert not ce.check_gpus(2, "auto").ok and not ce.check_gpus(0, "cuda").ok
    assert ce.check_output_dir(str(tmp_path / "new" / "run")).ok
    (tmp_path / "file").write_text("")
    assert not ce.check_output_dir(str(tmp_path / "file" / "run")).ok  # under a file: nothing can be created


@pytest.mark.slow
def test_cli_exits_1_naming_the_failed_checks(tmp_path):
    (tmp_path / "file").write_text("")
    env = {**os.environ, "MNIST_CACHE_DIR": str(tmp_path / "empty")}
    result = subprocess.run(
        [
            sys.executable,
            "check_environment.py",
            "--config",
            "configs/tiny.yaml",
            "--output_dir",
            str(tmp_path / "file" / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    assert f"failed on {platform.node()}: mnist, output dir" in result.stderr
    assert "FAIL  mnist" in result.stdout and "FAIL  output dir" in result.stdout and "ok    torch" in result.stdout
