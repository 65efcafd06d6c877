"""Command-line flags: argparse that fails in one line, and the checks every command shares."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

from runtime.errors import UserError


def suggest(name: str, known: Sequence[str]) -> str:
    """ "; did you mean 'x'?" for the closest of ``known`` to a mistyped ``name``, or ""."""
    match = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class CliParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (through UserError).

    Flags must be spelled out: argparse's default would silently take a mistyped, cut-off
    ``--learning_rat`` for ``--learning_rate``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            flag = message.split(":", 1)[1].split()[0]
            known = [o for a in self._actions for o in a.option_strings]
            message += suggest(flag.split("=")[0], known)
        raise UserError(f"{message} (see {self.prog} --help)")


def require_positive(values: object, names: Sequence[str]) -> None:
    """Raise UserError for the first flag in ``names`` whose value (an attribute of ``values``) is below 1."""
    for name in names:
        if getattr(values, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(values, name)}")
