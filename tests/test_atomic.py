"""Every writer goes through ``io.atomic``: complete or not at all, failures name the target."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_dsm.errors import DSMError, WriteError
from nnunetv2_dsm.io import atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_write_replaces_the_target_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "sub" / "report.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert target.read_text() == '{\n  "a": 2\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_temporary_keeps_the_format_suffix(tmp_path: Path):
    with atomic.atomic_path(tmp_path / "case.nii.gz") as tmp:
        assert tmp.name == f".case.tmp-{os.getpid()}.nii.gz" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"x"


def test_failed_write_keeps_the_previous_target(tmp_path: Path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_strict_json_refuses_nan(tmp_path: Path):
    with pytest.raises(ValueError):
        atomic.write_json(tmp_path / "x.json", {"dice": float("nan")})
    assert not list(tmp_path.iterdir())


def test_unwritable_target_is_a_write_error_naming_the_target(tmp_path: Path):
    """A folder that cannot be created (a file is in the way; as root, permissions are not enforced)."""
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(WriteError, match=r"could not write .*taken/out.json .*How to fix") as info:
        atomic.write_json(tmp_path / "taken" / "out.json", {})
    assert isinstance(info.value, DSMError) and isinstance(info.value, OSError)


def test_disk_full_is_a_write_error_and_nothing_is_left(tmp_path: Path):
    """A file-size limit makes the kernel refuse the write past 4 kB, as a full disk does."""
    target = tmp_path / "big.bin"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from nnunetv2_dsm.io import atomic\n"
        "from nnunetv2_dsm.errors import WriteError\n"
        "try:\n"
        f"    atomic.write_bytes({str(target)!r}, b'x' * 100000)\n"
        "except WriteError as err:\n"
        "    print(err); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert f"could not write {target}" in proc.stdout
    assert not list(tmp_path.iterdir()), "no half-written file and no temporary"


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path: Path):
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".checkpoint_best.tmp-{dead}.pth"
    busy = tmp_path / f".checkpoint_best.tmp-{live}.pth"
    stale.write_bytes(b"")
    busy.write_bytes(b"")
    with atomic.atomic_path(tmp_path / "checkpoint_best.pth") as tmp:
        tmp.write_bytes(b"weights")
    assert not stale.exists() and busy.exists()
    assert (tmp_path / "checkpoint_best.pth").read_bytes() == b"weights"


def test_every_method_trainer_of_the_package_writes_checkpoints_atomically():
    """DSM, SDSeg and DiffuGTS trainers inherit ``AtomicCheckpoint``; only the stock nnU-Net baselines do not."""
    import importlib
    import inspect
    import pkgutil

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import nnunetv2_dsm.trainers as trainers
    from nnunetv2_dsm.trainers.baselines import StockBaselineTrainer
    from nnunetv2_dsm.trainers.checkpointing import AtomicCheckpoint

    checked, plain = [], []
    for info in pkgutil.iter_modules(trainers.__path__):
        module = importlib.import_module(f"{trainers.__name__}.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, nnUNetTrainer) or name.startswith("_"):
                continue
            if issubclass(cls, StockBaselineTrainer) or issubclass(cls, AtomicCheckpoint):
                checked.append(name)
            else:
                plain.append(name)
    assert {"DSMTrainer", "DSMTrainerStage2", "SDSegTrainer", "DiffuGTSTrainer"} <= set(checked)
    assert plain == [], f"trainers saving checkpoints with nnU-Net's plain torch.save: {plain}"
