from pathlib import Path

import pytest

from nnunetv2_dsm.data.fetch import example_ct_dir as _example_ct_dir


@pytest.fixture(scope="session")
def example_ct_dir() -> Path:
    """Real CT reference files from the TotalSegmentator source distribution (cached download)."""
    return _example_ct_dir()
