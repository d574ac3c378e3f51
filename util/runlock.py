"""One live run per folder: a lock file holding the pid and host of the process that owns the folder.

Two runs writing one folder interleave their metrics and overwrite each other's checkpoints and images, so a
second run is refused while the first lives. A lock whose process is gone (on this host) is stale: it is
taken over with a message. A lock of another host cannot be checked from here; the message says how to clear it.
"""
import contextlib
import json
import os
import socket
import tempfile
import time

from util.checkpoint import remove_stale_temp_files
from util.distributed import broadcast_object, rank
from util.errors import UserError

LOCK_NAME = ".transdiff.lock"


class FolderInUse(UserError):
    logs_to_run_folder = False  # the log.txt there is the other run's


def held_by_another(folder):
    """Whether another process, live or on another host, holds the lock of `folder`."""
    owner = _read(os.path.join(folder, LOCK_NAME)) or {}
    if owner.get("host") not in (None, socket.gethostname()):
        return True
    return isinstance(owner.get("pid"), int) and owner["pid"] != os.getpid() and _alive(owner["pid"])


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def acquire(folder, what="run", log=print):
    """Take the lock of `folder` for this process; returns what `release` takes. Raises UserError when another
    live process holds it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    while True:
        try:
            _create(path, me)
            return path
        except FileExistsError:
            owner = _read(path) or {}
        if (owner.get("pid"), owner.get("host")) == (me["pid"], me["host"]):
            return None  # this process holds it already (or had its pid before a restart): nothing to release
        what = owner.get("what", "run")
        if owner.get("host") not in (None, me["host"]):
            raise FolderInUse(f"{folder} is in use by a {what} of pid {owner.get('pid')} on host {owner['host']} "
                              f"(since {owner.get('since')}), which cannot be checked from host {me['host']}: "
                              f"wait for it or use another folder (--output_dir); if no run lives there any "
                              f"more, delete {path} to take the folder over")
        if isinstance(owner.get("pid"), int) and _alive(owner["pid"]):
            raise FolderInUse(f"{folder} is in use by a live {what} (pid {owner['pid']} on this host, since "
                              f"{owner.get('since')}): wait for it to end, stop it, or use another folder "
                              f"(--output_dir); if pid {owner['pid']} is not that {what} (its pid was reused "
                              f"after it died), delete {path} to take the folder over")
        log(f"taking over the stale lock of {folder} (its {what}, pid {owner.get('pid')}, is gone)")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _create(path, content):
    """Create `path` holding `content`, whole or not at all; FileExistsError when it exists (a hard link of a
    finished temporary file: no reader ever sees a half-written lock)."""
    fd, tmp = tempfile.mkstemp(prefix=".lock-", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.link(tmp, path)
    finally:
        os.remove(tmp)


def release(path):
    """Remove the lock at `path` (from `acquire`) if this process holds it."""
    owner = None if path is None else _read(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def hold_folder(folder, what, temp_folders=None):
    """Collective: rank 0 locks `folder` for this run and removes the temporary files that killed runs left in
    `temp_folders` (default: `folder`); every rank learns the outcome, so a refusal stops them all alike.
    Returns (what `release` takes, notes for the log)."""
    lock, notes, error = None, [], None
    if rank() == 0:
        try:
            lock = acquire(folder, what, log=notes.append)
            removed = [n for f in (temp_folders or [folder]) for n in remove_stale_temp_files(f)]
            if removed:
                notes.append(f"removed {len(removed)} temporary file(s) left by a run killed while writing them: "
                             f"{', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")
        except (UserError, OSError) as e:
            release(lock)
            error = (FolderInUse if isinstance(e, FolderInUse) else UserError, str(e))
    error = broadcast_object(error)  # (type, message): the same exception on every rank
    if error:
        raise error[0](error[1])
    return lock, notes
