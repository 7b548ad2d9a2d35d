"""Temporaries of killed runs are removed by the next run writing the same output; live runs' are kept."""

import os
import subprocess
import sys
from pathlib import Path

from nnunetv2_dsm.data.raw_dataset import staged_dataset
from nnunetv2_dsm.io.stale import pid_alive, remove_stale


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_keeps_live_writers(tmp_path: Path):
    dead, live = _dead_pid(), os.getppid()
    assert not pid_alive(dead) and pid_alive(live)
    files = [tmp_path / f"checkpoint_best.pth.tmp-{dead}", tmp_path / f"checkpoint_best.pth.tmp-{live}",
             tmp_path / "checkpoint_best.pth.tmp-notapid"]
    for f in files:
        f.write_bytes(b"")
    assert remove_stale(files) == [files[0]]
    assert not files[0].exists() and files[1].exists() and files[2].exists()


def test_staging_left_by_a_killed_run_is_removed_and_reported(tmp_path: Path, capsys):
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.staging-{dead}-x1y2"
    (stale / "imagesTr").mkdir(parents=True)
    busy = tmp_path / f".out.staging-{live}-a1b2"
    busy.mkdir()
    with staged_dataset(tmp_path / "out") as stage:
        (stage / "dataset.json").write_text("{}")
    assert (tmp_path / "out" / "dataset.json").is_file()
    assert not stale.exists() and busy.exists()
    assert f"removed {stale}, left by an interrupted earlier run" in capsys.readouterr().out
