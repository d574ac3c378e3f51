"""Stopping a training run cleanly when a scheduler preempts it, and saving on a clock.

A stop signal (SIGTERM, SIGUSR1 by default: --stop_signals) only sets a flag. The flag of every rank rides on
the per-step all-reduce of the training step (`StepRequests`), so all ranks learn at the same optimizer step
that one of them was asked to stop, finish that step, save checkpoint-last.pth and exit with PREEMPTED_EXIT.
The same all-reduce carries "my --save_every_minutes clock is due", so time-based saves happen on every rank
at the same step although their clocks differ.

Under torchrun a worker also asks the kernel for SIGTERM when its launcher dies (PR_SET_PDEATHSIG): a
`kill -9` of torchrun then stops the ranks like a preemption instead of leaving them training on alone.
"""
import ctypes
import os
import signal
import time

import torch

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": the run saved its position and
# wants the same command run again (a requeue script tests for it)
PREEMPTED_EXIT = 75
DEFAULT_STOP_SIGNALS = "SIGTERM,SIGUSR1"
# torchrun's agent kills the workers it signalled 30 s later; a worker whose launcher is gone gets as long
# to save, then the kernel ends it, so that no rank of a killed job outlives it by more
LAUNCHER_GONE_GRACE_S = 30
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_received = []  # names of the stop signals received, in order


class Preempted(Exception):
    """The run stopped on a stop signal after saving its position; the same command continues it."""


def parse_signals(text):
    """'SIGTERM,USR1' -> [Signals]; a ValueError names an unknown one."""
    out = []
    for name in (s.strip().upper() for s in text.split(",") if s.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if not hasattr(signal.Signals, name) or name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{name} is not a signal that can be caught")
        out.append(signal.Signals[name])
    return out


def _on_signal(signum, frame):
    # only what is safe inside a handler: the run looks at the flag after its current optimizer step
    _received.append(signal.Signals(signum).name)
    if _launcher_gone():
        signal.alarm(LAUNCHER_GONE_GRACE_S)  # SIGALRM's default action ends the process


def install(signals):
    """Handle `signals` (a list from parse_signals) as stop requests from now on; returns the old handlers."""
    _received.clear()
    return {s: signal.signal(s, _on_signal) for s in signals}


def uninstall(old):
    for s, handler in old.items():
        signal.signal(s, handler)
    _received.clear()


def stop_requested():
    """The name of the first stop signal received (None: none)."""
    return _received[0] if _received else None


_launcher_pid = None


def _launcher_gone():
    return _launcher_pid is not None and os.getppid() != _launcher_pid


def end_with_launcher():
    """Under torchrun: SIGTERM to this process when its launcher dies (Linux); a no-op elsewhere. A launcher
    that died before the call is caught by comparing the parent pid."""
    global _launcher_pid
    if "TORCHELASTIC_RUN_ID" not in os.environ or not hasattr(os, "getppid"):
        return
    _launcher_pid = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent check below still runs at every start
        pass
    if _launcher_gone():
        os.kill(os.getpid(), signal.SIGTERM)


class StepRequests:
    """What each rank asks of the step in progress (stop, save), agreed through the step's all-reduce."""

    def __init__(self, save_every_minutes=0.0):
        self.save_every_s = 60.0 * (save_every_minutes or 0.0)
        self.last_save = time.monotonic()
        self.stop = self.save = False

    def local(self, device):
        """This rank's requests as a float tensor [stop, save] to sum over ranks."""
        save_due = bool(self.save_every_s) and time.monotonic() - self.last_save >= self.save_every_s
        return torch.tensor([float(stop_requested() is not None), float(save_due)], device=device)

    def agree(self, summed):
        """Take the summed requests: any rank's request holds for all."""
        self.stop, self.save = (v > 0 for v in summed)

    def saved(self):
        self.last_save = time.monotonic()
        self.save = False
