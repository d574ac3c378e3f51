"""Errors a user can cause and fix: each entry point reports them as one line naming the problem and the flags
that fix it, without a traceback, printed once (by rank 0 under torchrun), and exits non-zero.

Raise `UserError` (or a subclass) wherever such an error is found; wrap an entry point's work in
`exit_on_user_error(prog)`; parse its flags with `OneLineParser`.
"""
import argparse
import contextlib
import os
import sys

USER_ERROR_EXIT = 1
USAGE_EXIT = 2  # argparse's code for a refused command line


class UserError(Exception):
    """A problem with the command, the files or the folders it names; the message says how to fix it."""


def _reporting_rank():
    """Only rank 0 speaks: every rank checks the same flags and files, so every rank finds the same error."""
    return int(os.environ.get("RANK", 0)) == 0


def report(prog, message):
    """Print `prog: error: message` on one line, on rank 0 only."""
    if _reporting_rank():
        line = " ".join(str(message).split())  # one line, whatever the message was built from
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)


def report_once(prog, err):
    """`report` an exception unless it was reported already (main reports before the process group ends)."""
    if not getattr(err, "reported", False):
        report(prog, err)
        err.reported = True


@contextlib.contextmanager
def exit_on_user_error(prog):
    try:
        yield
    except UserError as err:
        report_once(prog, err)
        sys.exit(USER_ERROR_EXIT)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are one line on rank 0 (not the usage block on every rank); --help is as usual."""

    def error(self, message):
        report(self.prog, f"{message} (--help lists the flags)")
        sys.exit(USAGE_EXIT)
