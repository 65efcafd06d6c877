"""User-facing errors and the exit statuses of the command-line tools.

Exit statuses (SLURM scripts and wrappers rely on them):

- 0: done.
- EXIT_USER_ERROR (2): bad input (nothing was written) or a diverged run (non-finite loss; the
  last good checkpoint is kept); one line on stderr names the problem and the fix. Rerunning the
  same command fails the same way: never requeue on it.
- EXIT_RESUMABLE (75, ``EX_TEMPFAIL`` in sysexits.h): train.py was asked to stop by SIGTERM,
  SIGINT or SIGUSR1 and wrote a checkpoint first; ``train.py --resume`` continues exactly there.
  Also a full disk (ENOSPC, EDQUOT) or an I/O error while writing (``StorageError``): nothing
  half-written is left, and once space is freed the same command (``--resume`` for training)
  continues. Schedulers may retry on 75.
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


class StorageError(Exception):
    """A write failed for want of space (ENOSPC, EDQUOT) or with an I/O error; nothing half-written was left.

    The message names the file, the bytes it needed and those free; ``hint`` is what to do next,
    which a caller that knows more (train.py: the last good checkpoint) may replace.
    """

    def __init__(self, problem: str, hint: str = "free some space and run the command again"):
        super().__init__(problem)
        self.problem, self.hint = problem, hint

    def __str__(self) -> str:
        return f"{self.problem}; {self.hint}"


def run_cli(main: Callable[[], None]) -> None:
    """Run a command-line entry point: a UserError becomes one line and exit 2, a StorageError one line and exit 75."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_RESUMABLE)
