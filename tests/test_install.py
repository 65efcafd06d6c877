"""The install model: the repository runs from its root and installing it claims no import names, so
modules of the same generic names elsewhere in a user's environment (``config``, ``data``) neither
break it nor are shadowed by it."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ENV, ROOT, TINY_CONFIG

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment, and runs the commands

POISON = "raise ImportError(\"the user's own {name!r} module was imported instead of text2digit's\")\n"


def test_the_wheel_installs_no_modules(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("text2digit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert names and all(name.startswith("text2digit-") and ".dist-info/" in name for name in names), names


def environment_with_generic_modules(folder: Path) -> Path:
    """A fresh virtual environment that sees this one's packages (torch, open_clip, ...) and also holds
    modules named ``config`` and ``data`` that fail if imported. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "config.py").write_text(POISON.format(name="config"))
    (site / "data").mkdir()
    (site / "data" / "__init__.py").write_text(POISON.format(name="data"))
    return python


def test_training_and_sampling_ignore_same_named_modules_of_the_environment(tmp_path):
    python = environment_with_generic_modules(tmp_path / "venv")
    probe = subprocess.run([str(python), "-c", "import data"], cwd=tmp_path, capture_output=True, text=True)
    assert "the user's own 'data' module" in probe.stderr  # the environment really holds them
    out = tmp_path / "run"
    env = {**ENV, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    train = [
        str(python),
        "train.py",
        "--config",
        str(TINY_CONFIG),
        "--train_subset",
        "128",
        "--num_epochs",
        "1",
        "--sample_steps",
        "2",
        "--output_dir",
        str(out),
    ]
    trained = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    sample = [str(python), "sample.py", "--prompt", "7", "--steps", "2", "--output_dir", str(out)]
    sampled = subprocess.run(sample, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert Path(sampled.stdout.strip()).is_file()


@pytest.mark.parametrize("name", ["data", "models", "training", "runtime", "ddpm", "evaluation"])
def test_this_environment_claims_none_of_the_project_folders(tmp_path, name):
    """Outside the repository, the environment the README installs has no module of the project's folder names."""
    probe = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
    assert f"No module named '{name}'" in probe.stderr
