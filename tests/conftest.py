import os

# Triton kernels run in Triton's interpreter on machines without CUDA, so the CPU suite checks them too.
# Set before anything imports triton (the mode is fixed when a kernel is decorated).
if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

# nnU-Net's validation, evaluation and export start nnUNet_def_n_proc spawned workers (default 8), each
# importing torch and nnunetv2: on a 2-core machine that start-up costs more than the tiny tests' training.
os.environ.setdefault("nnUNet_def_n_proc", "1")

import importlib.util
from pathlib import Path

import pytest
import torch

from nnunetv2_dsm.data.fetch import example_ct_dir as _example_ct_dir


@pytest.fixture(scope="session")
def example_ct_dir() -> Path:
    """Real CT reference files from the TotalSegmentator source distribution (cached download)."""
    return _example_ct_dir()


@pytest.fixture
def one_thread():
    """torch on one thread: unit tests run thousands of tiny ops, where extra threads only add
    synchronisation on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def reference():
    """mamba-ssm's sequential ``selective_scan_ref`` (its Python reference; no CUDA extension needed)."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm not installed: MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "
                    "pip install --no-build-isolation mamba-ssm==2.3.2.post1")
    from _mamba_reference import load_selective_scan_ref

    return load_selective_scan_ref()
