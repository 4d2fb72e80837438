"""What every launch script shares: bad input ends the job with one clear line."""

import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from absl import logging

T = TypeVar("T")

# Errors that mean the input was wrong (a path, a config value, a malformed
# file). Their messages name the offending item; a traceback would bury it.
BAD_INPUT = (ValueError, FileNotFoundError)


def run_or_exit(job: Callable[[], T]) -> T:
    """Runs `job()`; on bad input prints the message and exits with status 1.

    The traceback is logged at verbosity 1 (`--v=1`), for when the message is
    not enough to find where the input was read.
    """
    try:
        return job()
    except BAD_INPUT as error:
        logging.error("%s: %s", type(error).__name__, error)
        logging.vlog(1, "%s", traceback.format_exc())
        print(
            f"error: {error}\n(run with --v=1 to see where it was raised)",
            file=sys.stderr,
        )
        sys.exit(1)
