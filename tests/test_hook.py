"""The start-up hook makes nnU-Net's own lookup functions find DSM classes, for both install modes.

Each install mode is reproduced exactly as pip does it: the package is built into a wheel with the
PEP 517 / PEP 660 backend hooks and unpacked into a fresh site directory, which a clean interpreter
(``-S``: no other .pth files processed) adds with ``site.addsitedir`` like site-packages.
"""

import json
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LOOKUPS = textwrap.dedent("""
    import json, os, sys, site
    site.addsitedir(sys.argv[1])
    sys.path.append(sys.argv[2])
    torch_at_startup = "torch" in sys.modules
    from os.path import join
    import nnunetv2
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import get_labelmanager_class_from_plans

    def lookups():
        trainer = recursive_find_trainer_class_by_name("DSMTrainer_2epochs")
        planner = recursive_find_python_class(join(nnunetv2.__path__[0], "experiment_planning"), "DSMPlanner",
                                              current_module="nnunetv2.experiment_planning")
        label_manager = get_labelmanager_class_from_plans({"label_manager": "DSMLabelManager"})
        stock = recursive_find_trainer_class_by_name("nnUNetTrainer")
        return [c.__module__ + "." + c.__name__ for c in (trainer, planner, label_manager, stock)], \\
            sys.modules[trainer.__module__].__file__

    if __name__ == "__main__":
        import multiprocessing as mp
        names, trainer_file = lookups()
        diffusers_after_lookup = "diffusers" in sys.modules
        with mp.get_context("spawn").Pool(1) as pool:
            worker_names = pool.apply(lookups)[0]
        print(json.dumps({"torch_at_startup": torch_at_startup, "names": names, "worker_names": worker_names,
                          "trainer_file": trainer_file, "env": os.environ.get("nnUNet_extTrainer"),
                          "diffusers_after_lookup": diffusers_after_lookup}))
""")


def _build_and_unpack(mode: str, tmp_path: Path) -> Path:
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    hook = "build_editable" if mode == "editable" else "build_wheel"
    subprocess.run([sys.executable, "-c",
                    f"import setuptools.build_meta as b, sys; print(b.{hook}(sys.argv[1]))", str(wheel_dir)],
                   cwd=REPO, check=True, capture_output=True, text=True)
    wheel = next(wheel_dir.glob("*.whl"))
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        assert "nnunetv2_dsm_hook.pth" in zf.namelist(), f"{wheel.name} lacks the start-up hook"
        if mode == "regular":
            kernels = {"nnunetv2_dsm/networks/csrc/selective_scan_cpu.c",
                       "nnunetv2_dsm/networks/csrc/guided_diffusion_cpu.c"}
            assert kernels <= set(zf.namelist()), f"{wheel.name} lacks the CPU kernel sources"
        zf.extractall(site_dir)
    return site_dir


@pytest.mark.parametrize("mode", ["regular", "editable"])
def test_stock_lookups_find_dsm_classes(mode: str, tmp_path: Path) -> None:
    site_dir = _build_and_unpack(mode, tmp_path)
    script = tmp_path / "lookups.py"
    script.write_text(LOOKUPS)
    env_site = sysconfig.get_paths()["purelib"]
    out = subprocess.run([sys.executable, "-S", str(script), str(site_dir), env_site], cwd=tmp_path,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = [
        "nnunetv2_dsm.trainers.variants.DSMTrainer_2epochs",
        "nnunetv2_dsm.planners.dsm_planner.DSMPlanner",
        "nnunetv2_dsm.label_handling.dsm_label_manager.DSMLabelManager",
        "nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer",
    ]
    assert result["names"] == expected
    assert result["worker_names"] == expected, "spawned worker processes must find the DSM classes too"
    assert result["env"] is None, "no environment variable is needed"
    assert not result["torch_at_startup"], "the start-up hook must not import torch"
    # nnU-Net's lookup imports every trainer module: the SDSeg and DiffuGTS networks (diffusers) load only when built
    assert not result["diffusers_after_lookup"], "finding a trainer must not import diffusers"
    trainer_file = Path(result["trainer_file"]).resolve()
    if mode == "regular":
        assert trainer_file.is_relative_to(site_dir.resolve())
    else:
        assert trainer_file.is_relative_to(REPO)


def test_network_class_names_in_plans_resolve() -> None:
    """The planners write these names without importing the networks; nnU-Net imports them to build one."""
    import importlib

    from nnunetv2_dsm.planners.sdseg_planner import SDSEG_NETWORK
    from nnunetv2_dsm.trainers.diffugts_trainer import DIFFUGTS_NETWORK

    for name in (SDSEG_NETWORK, DIFFUGTS_NETWORK):
        module, cls = name.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), cls), type), name


def test_unknown_class_still_reported_by_nnunet() -> None:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer DSMTrainer_doesnotexist"):
        recursive_find_trainer_class_by_name("DSMTrainer_doesnotexist")


def test_documented_fallback_without_pth_processing(tmp_path: Path) -> None:
    """Where .pth files are not processed, nnUNet_extTrainer (as the README says) still finds DSM trainers."""
    trainers = REPO / "nnunetv2_dsm" / "trainers"
    script = textwrap.dedent("""
        import sys
        sys.path[:0] = sys.argv[1:3]
        assert not any(type(f).__name__ == "_Finder" for f in sys.meta_path), "hook must not be active"
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        trainer = recursive_find_trainer_class_by_name("DSMTrainer_2epochs")
        print(trainer.__name__)
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "nnUNet_extTrainer": str(trainers)}
    out = subprocess.run([sys.executable, "-S", "-c", script, str(REPO), sysconfig.get_paths()["purelib"]],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "DSMTrainer_2epochs"
