"""Keep Hugging Face libraries off the network while text encoders load."""

import contextlib
import os
from collections.abc import Iterator

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set the offline switches of huggingface_hub/transformers for the duration of the block.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into ``constants.HF_HUB_OFFLINE``; setting the
    environment variable alone is therefore not enough once it is imported, so the constant is switched
    too. Importing it before changing the environment keeps offline mode from leaking into the rest of
    the process. Everything is restored on exit.
    """
    from huggingface_hub import constants

    saved_env = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    saved_constant = constants.HF_HUB_OFFLINE
    try:
        for name in _OFFLINE_VARS:
            os.environ[name] = "1"
        constants.HF_HUB_OFFLINE = True
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_constant
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
