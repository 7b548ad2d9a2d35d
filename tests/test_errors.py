"""One error base class and one error path for the ``nnunetv2_dsm`` command."""

import importlib
import inspect
import pkgutil

import pytest

import nnunetv2_dsm
from nnunetv2_dsm.cli.main import main
from nnunetv2_dsm.data.merge import MergeError
from nnunetv2_dsm.errors import DSMError


def _project_modules():
    for info in pkgutil.walk_packages(nnunetv2_dsm.__path__, "nnunetv2_dsm."):
        if info.name.endswith("._hook"):
            continue
        yield importlib.import_module(info.name)


def test_every_project_error_derives_from_the_base_class():
    errors = {
        f"{module.__name__}.{name}": cls
        for module in _project_modules()
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__
    }
    assert len(errors) >= 15, sorted(errors)
    outside = sorted(name for name, cls in errors.items() if not issubclass(cls, DSMError))
    assert not outside, f"error classes outside DSMError: {outside}"


@pytest.mark.parametrize("argv", [
    ["merge", "--source", "a=/nonexistent_a", "--source", "b=/nonexistent_b", "--out", "OUT"],
    ["recipe", "msd09", "--src", "/nonexistent_src", "--out", "OUT"],
])
def test_cli_prints_one_message_and_exits_2(argv, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/nonexistent" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing is written on bad input"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(MergeError, match="dataset.json not found"):
        main(["--debug", "merge", "--source", "a=/nonexistent_a", "--source", "b=/nonexistent_b",
              "--out", str(tmp_path / "out")])
