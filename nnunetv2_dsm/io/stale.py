"""Temporary files and folders left behind by killed runs.

Writers name their temporaries with the writing process's id (``<name>.tmp-<pid>``,
``.<name>.staging-<pid>-<random>``). A temporary whose process no longer runs belongs to a run that was
killed before it could clean up, and is removed by the next run that writes the same output.
"""

import os
import re
import shutil
from pathlib import Path

_PID = re.compile(r"(?:\.tmp-|\.staging-|\.old-)(\d+)")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (any user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_pid(path: Path) -> int | None:
    match = _PID.search(path.name)
    return int(match.group(1)) if match else None


def remove_stale(candidates: list[Path]) -> list[Path]:
    """Remove the candidates whose writing process is gone; returns what was removed.

    Temporaries of a running process (another run writing the same output right now) are left alone.
    """
    removed = []
    for path in candidates:
        pid = writer_pid(path)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
