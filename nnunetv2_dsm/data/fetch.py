"""Fetch the real example CT shipped in the TotalSegmentator source distribution.

The sdist of PyPI package ``totalsegmentator`` holds real abdominal CT with organ segmentations
in ``tests/reference_files``. We fetch it with pip (the only channel guaranteed to reach a
package registry behind proxies and mirrors) and cache the unpacked folder.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.settings import cache_dir

TOTALSEG_VERSION = "2.18.0"
SDIST_NAME = f"totalsegmentator-{TOTALSEG_VERSION}"


class FetchError(DSMError, RuntimeError):
    pass


def example_ct_dir(quiet: bool = False) -> Path:
    """Folder with the example CT reference files, downloading the sdist (about 38 MB) on first use."""
    target = cache_dir() / SDIST_NAME / "reference_files"
    if (target / "example_ct.nii.gz").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(
            f"Fetching real example CT: pip download {SDIST_NAME} source distribution (about 38 MB) "
            f"into {target.parent} (one time; set DSM_CACHE to change the cache folder)",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"totalsegmentator=={TOTALSEG_VERSION}", "-d", tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("totalsegmentator-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise FetchError(
                f"Could not download the {SDIST_NAME} source distribution from the package registry "
                f"(command: {' '.join(cmd)}).\npip said:\n{proc.stderr.strip()[-2000:]}\n"
                "Check that pip can reach PyPI (proxy / index-url settings), or download the file "
                f"{SDIST_NAME}.tar.gz elsewhere and unpack its tests/reference_files folder to {target}."
            )
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if "/tests/reference_files/" in m.name]
            tar.extractall(tmp, members=members, filter="data")
        staged = Path(tmp) / SDIST_NAME / "tests" / "reference_files"
        if not (staged / "example_ct.nii.gz").is_file():
            raise FetchError(f"{archives[0].name} does not contain tests/reference_files/example_ct.nii.gz")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target
