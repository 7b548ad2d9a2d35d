"""Command-line arguments are checked before anything runs or is written."""

import pytest
import torch

from nnunetv2_dsm.cli.main import main


def test_predict_output_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    existing = tmp_path / "result.txt"
    existing.write_text("keep me")
    code = main(["predict", "-i", str(tmp_path), "-o", str(existing), "-m", str(tmp_path), "--prompts", "liver",
                 "--device", "cpu"])
    assert code == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


def test_predict_on_cuda_without_a_gpu_says_so_before_creating_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(["predict", "-i", str(tmp_path), "-o", str(out), "-m", str(tmp_path), "--prompts", "liver"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    assert not out.exists()


def test_demo_rejects_a_fold_it_does_not_have_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--fold", "7", "--work-dir", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    assert "invalid choice: '7'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom nnunetv2_dsm.cli.main import build_parser\n"
            "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("False"), "nnunetv2_dsm --help imported torch"
