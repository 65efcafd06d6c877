"""Fixtures shared by several test files (the helpers they use live in tests/helpers.py)."""

import os

# Threads that wait sleep instead of spinning, in this process and every process it starts (set before torch
# loads OpenMP). With spinning threads a 2-thread train.py took 147 s instead of 34 s on a 2-core machine
# that another job was using: its waiting thread burned the core the working one needed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import train_tiny, write_untrained_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint, for the tests of the scripts that read one."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_epoch_0001.pt")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The output folder of helpers.TINY_RUN, trained once for every test that reads a real run's files.

    Tests may add files to it (samples, evaluation reports) but change or remove none that train.py wrote."""
    return train_tiny(tmp_path_factory.mktemp("tiny_run"))
