"""The project's error base class. Imports nothing, so every module can use it.

Every error raised for bad input or bad state (a missing file, an inconsistent dataset, a prompt the
model cannot answer) derives from ``DSMError`` as well as from the built-in type that describes it
(``ValueError``, ``FileNotFoundError``, ...). The ``nnunetv2_dsm`` command prints a ``DSMError`` as one
message and exits with status 2; ``--debug`` shows the traceback as well.
"""


class DSMError(Exception):
    """Bad input or state, with a message that names the file or setting and the fix."""
