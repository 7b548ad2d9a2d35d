"""Atomic writes: every file and output folder the project writes goes through here.

A writer writes a temporary file beside its target, named ``.<name>.tmp-<pid><suffix>`` (the target's
suffix is kept because SimpleITK and matplotlib pick the format from it), and renames it over the
target only when the write completed. So a reader never sees half a file, a failed write leaves the
previous target as it was, and the temporary of a killed writer is removed by the next write of the
same target (``io.stale``). Any ``OSError`` of the write (a full disk, a read-only folder) becomes a
``WriteError`` that names the target.

Multi-file outputs are assembled in a staging folder ``.<name>.staging-<pid>-<random>`` beside the
output (``staged_folder``) and moved into place a folder at a time when complete.
"""

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nnunetv2_dsm.errors import WriteError
from nnunetv2_dsm.io.stale import remove_stale

DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz")


def file_suffix(path: Path) -> str:
    """The format suffix of a file name, ``.nii.gz`` counted as one."""
    for suffix in DOUBLE_SUFFIXES:
        if path.name.endswith(suffix):
            return suffix
    return path.suffix


def temporary_name(target: Path, suffix: str | None = None) -> Path:
    suffix = file_suffix(target) if suffix is None else suffix
    stem = target.name[: len(target.name) - len(file_suffix(target))] if file_suffix(target) else target.name
    return target.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")


def stale_temporaries(target: Path) -> list[Path]:
    """Temporaries of earlier writes of ``target`` (any process)."""
    suffix = file_suffix(target)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    return sorted(target.parent.glob(f".{stem}.tmp-*"))


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None,
                check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block completes, it replaces ``target``.

    ``check(tmp)`` runs before the rename (e.g. reading an image back: some writers return without
    error from a short write). On any error the temporary is removed, ``target`` is untouched, and
    an ``OSError`` is raised as ``WriteError`` naming ``target``.
    """
    target = Path(target)
    tmp = temporary_name(target, suffix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(stale_temporaries(target))
        yield tmp
        if not tmp.exists():
            raise WriteError(target, "the writer produced no file")
        if check is not None:
            check(tmp)
        os.replace(tmp, target)
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(target, err.strerror or str(err)) from err
    finally:
        if tmp.exists() and not tmp.is_dir():
            tmp.unlink()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            written = f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if written != len(data) or tmp.stat().st_size != len(data):
            raise WriteError(target, f"short write: {tmp.stat().st_size} of {len(data)} bytes")


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any, strict: bool = True) -> None:
    """JSON, indented. ``strict`` (``allow_nan=False``): undefined values must already be ``None``."""
    write_text(target, json.dumps(obj, indent=2, allow_nan=not strict) + "\n")


def write_csv(target: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(target, buffer.getvalue())


@contextmanager
def staged_folder(final: str | os.PathLike, existing: str = "refuse") -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; when the block completes it becomes ``final``.

    ``existing`` says what happens when ``final`` already exists: ``"refuse"`` (``FileExistsError``),
    ``"replace"`` (the old folder is swapped out and removed only after the new one is in place) or
    ``"merge"`` (the staged files are moved into it one by one, replacing files of the same name).
    On any error the staging folder is removed and ``final`` is left as it was (not created when it
    did not exist). Staging and old-copy folders of killed earlier runs are removed and reported.
    """
    if existing not in ("refuse", "replace", "merge"):
        raise ValueError(f"existing must be 'refuse', 'replace' or 'merge', got {existing!r}")
    final = Path(final).absolute()
    if final.exists() and existing == "refuse":
        raise FileExistsError(f"{final} already exists; choose another output folder or pass overwrite.")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale(sorted(final.parent.glob(f".{final.name}.staging-*"))
                                  + sorted(final.parent.glob(f".{final.name}.old-*"))):
            print(f"removed {stale}, left by an interrupted earlier run")
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-{os.getpid()}-"))
    except OSError as err:
        raise WriteError(final, err.strerror or str(err)) from err
    try:
        yield staging
        if not final.exists():
            os.replace(staging, final)
        elif existing == "merge":
            for item in sorted(staging.rglob("*")):
                target = final / item.relative_to(staging)
                if item.is_dir():
                    target.mkdir(exist_ok=True)
                else:
                    os.replace(item, target)
        else:
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-{os.getpid()}-"))
            os.replace(final, trash / final.name)
            os.replace(staging, final)
            shutil.rmtree(trash)
    except OSError as err:
        raise WriteError(final, err.strerror or str(err)) from err
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
