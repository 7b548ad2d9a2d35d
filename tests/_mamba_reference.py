"""Import ``mamba_ssm``'s sequential ``selective_scan_ref`` on machines without its CUDA extensions.

``mamba_ssm.ops.selective_scan_interface`` imports the compiled ``selective_scan_cuda`` module at
import time although ``selective_scan_ref`` is plain PyTorch. Missing compiled modules are given empty
placeholders only for the duration of that import, so nothing else can mistake them for real kernels.
"""

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable

# Compiled extensions that mamba_ssm (and causal_conv1d) build only with CUDA.
_CUDA_EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")


def load_selective_scan_ref() -> Callable:
    """Return ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref``; ImportError if mamba_ssm is absent."""
    if importlib.util.find_spec("mamba_ssm") is None:
        raise ImportError(
            "mamba_ssm is not installed; on a CPU machine install it with "
            "MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation mamba-ssm==2.3.2.post1"
        )
    placeholders = [name for name in _CUDA_EXTENSIONS
                    if name not in sys.modules and importlib.util.find_spec(name) is None]
    for name in placeholders:
        sys.modules[name] = types.ModuleType(name)
    try:
        module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    finally:
        for name in placeholders:
            sys.modules.pop(name, None)
    return module.selective_scan_ref
