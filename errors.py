"""User-facing errors: one clear line on stderr, exit status 2, no traceback."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong checkpoint).

    The message names the problem and the fix in one line.
    """


def run_cli(main: Callable[[], None]) -> None:
    """Run a command-line entry point, turning UserError into a one-line message and exit 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
