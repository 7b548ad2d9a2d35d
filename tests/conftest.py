import os

# Triton kernels run in Triton's interpreter on machines without CUDA, so the CPU suite checks them too.
# Set before anything imports triton (the mode is fixed when a kernel is decorated).
if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

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
