"""The project's error classes that every layer raises. Import only the standard library, so any module
(command-line help included) can use them without pulling in torch or nnU-Net.

Every error raised for bad input or bad state (a missing file, an inconsistent dataset, a prompt the
model cannot answer) derives from ``DSMError`` as well as from the built-in type that describes it
(``ValueError``, ``FileNotFoundError``, ...). The ``nnunetv2_dsm`` command prints a ``DSMError`` as one
message and exits with status 2; ``--debug`` shows the traceback as well.
"""

import os
from collections.abc import Sequence


class DSMError(Exception):
    """Bad input or state, with a message that names the file or setting and the fix."""


PathLike = str | os.PathLike


class InputError(DSMError, ValueError):
    """A bad input. ``str(err)`` is ``"<path(s)>: <problem> How to fix: <fix>."``."""

    def __init__(self, paths: PathLike | Sequence[PathLike], problem: str, fix: str) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths: tuple[str, ...] = tuple(str(p) for p in paths)
        self.problem = problem
        self.fix = fix.rstrip(".")
        super().__init__(f"{', '.join(self.paths)}: {problem} How to fix: {self.fix}.")

    def __reduce__(self) -> tuple:
        # errors raised in nnU-Net's worker processes travel back pickled
        return type(self), (self.paths, self.problem, self.fix)


def raise_input_errors(problems: Sequence[InputError]) -> None:
    """Raise the problems found: the one error itself, or all of them as ``InputErrors``; nothing if none."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InputErrors(problems)


class InputErrors(InputError):
    """Several input problems found together; ``errors`` holds each one."""

    def __init__(self, errors: Sequence[InputError]) -> None:
        self.errors = list(errors)
        self.paths = tuple(dict.fromkeys(p for e in self.errors for p in e.paths))
        self.problem = f"{len(self.errors)} input problems"
        self.fix = "fix each problem listed"
        ValueError.__init__(
            self, f"{len(self.errors)} input problems found:\n" + "\n".join(f"- {e}" for e in self.errors)
        )

    def __reduce__(self) -> tuple:
        return type(self), (self.errors,)


class WriteError(DSMError, OSError):
    """An output could not be written completely (full disk, read-only target, short write)."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        OSError.__init__(
            self, f"could not write {self.path} ({reason}). How to fix: free disk space or choose a writable "
            "output folder; nothing was left half-written."
        )

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason)
