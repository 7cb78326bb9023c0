"""Where a run writes (save_dir, the metrics file): checked before step 1 and owned by one run.

A save_dir that is a file, read-only or in another run's hands would otherwise show only at the
first save, after the training it was meant to keep. The lock is a file in save_dir holding the
owner's host and PID; a lock whose PID is no longer alive on this host is stale and taken over.
Problems end the run before any process group forms, with a message (SystemExit).
"""
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

LOCK = ".galaxy-lock.json"


def check_writable(directory, what):
    """Create `directory` if needed and write a file in it: permission bits show neither a
    read-only mount nor what root may do, so only a real write proves it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except (FileExistsError, NotADirectoryError):
        raise SystemExit(f"galaxy: {what} {directory} is not a directory (a file is in the way)") from None
    except OSError as e:
        raise SystemExit(f"galaxy: {what} {directory} is not writable ({e.strerror})") from None


def check_outputs(save_dir, metrics_file):
    if save_dir:
        check_writable(save_dir, "save_dir")
    if metrics_file:
        if Path(metrics_file).is_dir():
            raise SystemExit(f"galaxy: --metrics_file {metrics_file} is a directory")
        check_writable(Path(metrics_file).parent, f"--metrics_file {metrics_file}: directory")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _owner(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # being written this instant, or damaged: not provably stale
        return {"host": "? (unreadable lock file)", "pid": None}


def _take(path, log):
    """Create the lock file, or take over a stale one; a live owner ends this run."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = _owner(path)
        if owner["host"] != socket.gethostname() or _alive(owner["pid"]):
            raise SystemExit(f"galaxy: save_dir {path.parent} is in use by another run: PID {owner['pid']} on host "
                             f"{owner['host']} since {owner.get('since')} ({owner.get('command')}); wait for it to "
                             f"end or use another save_dir (remove {path} if that run is gone)") from None
        log(f"galaxy: taking over the stale lock {path} of PID {owner['pid']}, which is no longer running")
        path.unlink()
        return _take(path, log)
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)}, f)


@contextlib.contextmanager
def save_dir_lock(save_dir, log=print):
    """Hold save_dir's lock for the block; released on any exit, errors included."""
    path = Path(save_dir) / LOCK
    _take(path, log)
    try:
        yield
    finally:
        if _owner(path).get("pid") == os.getpid():  # never remove a lock another run took over
            path.unlink()
