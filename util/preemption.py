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
import sys
import threading
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
# uncatchable, or taken: SIGALRM ends a worker whose launcher is gone, SIGCHLD is the data loader's
_NOT_STOP_SIGNALS = ("SIGKILL", "SIGSTOP", "SIGALRM", "SIGCHLD")

_received = []  # names of the stop signals received, in order
_installed = []  # the stop signals handled


class Preempted(Exception):
    """The run stopped on a stop signal after saving its position; the same command continues it."""


def parse_signals(text):
    """'SIGTERM,USR1' -> [Signals]; a ValueError names an unknown one."""
    out = []
    for name in (s.strip().upper() for s in text.split(",") if s.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name not in signal.Signals.__members__ or name in _NOT_STOP_SIGNALS:
            raise ValueError(f"{name} cannot be a stop signal: name catchable ones such as SIGTERM, SIGUSR1, SIGUSR2")
        out.append(signal.Signals[name])
    return out


def _on_signal(signum, frame):
    # only what is safe inside a handler: the run looks at the flag after its current optimizer step
    _received.append(signal.Signals(signum).name)
    if _launcher_gone():
        signal.alarm(LAUNCHER_GONE_GRACE_S)  # SIGALRM's default action ends the process


def install(signals):
    """Handle `signals` (a list from parse_signals) as stop requests from now on; returns the old handlers.
    Only the main thread may set handlers: called from another one (a notebook's worker thread), it sets none."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    _installed[:] = signals
    return {s: signal.signal(s, _on_signal) for s in signals}


def uninstall(old):
    for s, handler in old.items():
        signal.signal(s, handler)
    _received.clear()
    _installed.clear()


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of the data loaders. A scheduler or torchrun signals the whole process group, and a
    torch loader worker dies of SIGTERM, which fails the rank it serves before that saves. So a worker leaves
    the stop signals to a thread that ignores them, unless they come from the rank itself: that is how the
    rank ends its workers (multiprocessing's terminate) when it cannot stop them otherwise."""
    signals = set(_installed)
    if not signals:
        return
    rank_pid = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    def watch():
        while True:
            info = signal.sigwaitinfo(signals)
            if info.si_pid == rank_pid:
                os._exit(128 + info.si_signo)  # as the signal's default action would

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()


def stop_requested():
    """The name of the first stop signal received (None: none)."""
    return _received[0] if _received else None


def stop_reason():
    """What stopped the run, for the log: this process's first stop signal, or another rank's."""
    return stop_requested() or "a stop signal on another rank"


_launcher = None  # (this worker's pid, its launcher's pid) under torchrun


def _launcher_gone():
    # a process forked from the worker (a data loader's) inherits the handler, not the launcher
    return _launcher is not None and _launcher[0] == os.getpid() and os.getppid() != _launcher[1]


def end_with_launcher():
    """Under torchrun on Linux: SIGTERM to this process when its launcher dies; a no-op elsewhere."""
    global _launcher
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    _launcher = (os.getpid(), os.getppid())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != _launcher[1]:  # the launcher died between the two calls
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
