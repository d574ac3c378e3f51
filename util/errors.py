"""Errors a user can cause and fix: each entry point reports them as one line naming the problem and the flags
that fix it, without a traceback, printed once (by rank 0 under torchrun, or by the one rank that found it) and
appended to the run's log.txt, and exits non-zero.

Raise `UserError` (or a subclass) wherever such an error is found; wrap an entry point's work in
`exit_on_user_error(prog)`; parse its flags with `OneLineParser`.
"""
import argparse
import contextlib
import os
import re
import sys
import time

USER_ERROR_EXIT = 1
USAGE_EXIT = 2  # argparse's code for a refused command line
LOG_NAME = "log.txt"
# How long a rank other than 0 waits to hear that rank 0 reported the error: errors that every rank finds are
# found at the same point of the code, so rank 0 reports them within moments; one found by this rank alone is
# then reported by it.
RANK0_REPORT_WAIT_S = 10
# argparse takes only -1 and -1.5 for negative numbers: -1e-4 or -.5 would be read as a flag with no value
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class UserError(Exception):
    """A problem with the command, the files or the folders it names; the message says how to fix it."""

    # False where the run folder belongs to another run (a lock refusal): its log.txt is not ours to write
    logs_to_run_folder = True


def _rank():
    return int(os.environ.get("RANK", 0))


def one_line(message):
    return " ".join(str(message).split())


def append_to_log(log_file, line):
    """Append `line` to an existing run folder's log.txt, in the logger's format; never fails the report."""
    if log_file and os.path.isdir(os.path.dirname(os.path.abspath(log_file))):
        with contextlib.suppress(OSError), open(log_file, "a") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")


def report(prog, message, log_file=None, rank=None):
    """Print `prog: error: message` on one line (on rank 0 only, unless `rank` names the rank that speaks) and
    append it to `log_file` when given."""
    if rank is None and _rank() != 0:
        return
    line = f"{prog}: error: {f'rank {rank}: ' if rank else ''}{one_line(message)}"
    from tqdm import tqdm  # its write puts the line under a progress bar, not at its end

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()
    append_to_log(log_file, line)


def report_once(prog, err, log_file=None):
    """`report` an exception unless it was reported already (main reports before the process group ends). Under
    torchrun rank 0 speaks for errors every rank finds; another rank speaks when rank 0 did not."""
    if getattr(err, "reported", False):
        return
    err.reported = True
    from util import distributed  # torch only for a report under torchrun

    if not getattr(err, "logs_to_run_folder", True):
        log_file = None
    if _rank() == 0:
        report(prog, err, log_file)
        distributed.announce_error()
    elif not distributed.error_announced(RANK0_REPORT_WAIT_S):
        report(prog, err, log_file, rank=_rank())
        distributed.announce_error()


def another_rank_reported():
    """Whether a rank has reported an error: a collective that then fails on this rank (its peer has gone) is
    a consequence, not a second error to show."""
    from util import distributed

    return distributed.error_announced()


@contextlib.contextmanager
def exit_on_user_error(prog, log_file=None):
    try:
        yield
    except UserError as err:
        report_once(prog, err, log_file)
        sys.exit(USER_ERROR_EXIT)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are one line on rank 0 (not the usage block on every rank); --help is as usual.
    Negative numbers in any notation are values. With `run_folder_flag`, a refusal is also appended to the
    log.txt of the folder that flag names, when that folder exists and no other live run holds it."""

    def __init__(self, *args, run_folder_flag=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER
        self.run_folder_flag, self.run_folder, self._argv = run_folder_flag, None, []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else map(str, args))
        return super().parse_known_args(args, namespace)

    def _run_folder(self):
        if self.run_folder or not self.run_folder_flag:
            return self.run_folder
        flag, folder = f"--{self.run_folder_flag}", None
        for i, arg in enumerate(self._argv):
            if arg == flag and i + 1 < len(self._argv):
                folder = self._argv[i + 1]
            elif arg.startswith(flag + "="):
                folder = arg.split("=", 1)[1]
        if folder is None:
            folder = self.get_default(self.run_folder_flag)
        return folder

    def error(self, message):
        from util.runlock import held_by_another  # runlock raises UserError: imported when needed

        folder = self._run_folder()
        log_file = None if folder is None or held_by_another(folder) else os.path.join(folder, LOG_NAME)
        report(self.prog, f"{message} (--help lists the flags)", log_file)
        sys.exit(USAGE_EXIT)
