"""The errors of `moshi_eval` and the exit codes of `moshi-eval`, in one place.

Every error the eval raises for bad input, data, files or results derives from `MoshiEvalError`; its
`exit_code` is what `moshi-eval` exits with after printing the message (no traceback). Anything else is a
bug and keeps its traceback.
"""

EXIT_OK = 0
EXIT_ERROR = 1          # an error the message explains (data, checkpoint, output folder, non-finite loss...)
EXIT_USAGE = 2          # a bad command line (as argparse exits for the errors it finds itself)
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM: finished books are kept, a rerun resumes (128 + SIGINT)


class MoshiEvalError(Exception):
    """Base of the eval's errors: the message says what was wrong and, where it can, what to do."""

    exit_code: int = EXIT_ERROR


class UsageError(MoshiEvalError, ValueError):
    """A bad combination of command line values (or of the arguments of the function they set)."""

    exit_code = EXIT_USAGE
