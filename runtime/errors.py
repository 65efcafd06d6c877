"""User-facing errors and the exit statuses of the command-line tools.

Exit statuses (SLURM scripts and wrappers rely on them):

- 0: done.
- EXIT_USER_ERROR (2): bad input (nothing was written) or a diverged run (non-finite loss; the
  last good checkpoint is kept); one line on stderr names the problem and the fix. Rerunning the
  same command fails the same way: never requeue on it.
- EXIT_RESUMABLE (75, ``EX_TEMPFAIL`` in sysexits.h): train.py was asked to stop by SIGTERM,
  SIGINT or SIGUSR1 and wrote a checkpoint first; ``train.py --resume`` continues exactly there.
- anything else: a crash (a traceback says where); the newest checkpoint is still intact.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_RESUMABLE = 75


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
        sys.exit(EXIT_USER_ERROR)
