"""Fixtures shared by several test files (the helpers they use live in tests/helpers.py)."""

from pathlib import Path

import pytest

from tests.helpers import write_untrained_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint, for the tests of the scripts that read one."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_epoch_0001.pt")
