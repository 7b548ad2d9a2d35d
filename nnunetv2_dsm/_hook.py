"""Make nnU-Net's class lookups find DSM classes.

nnU-Net resolves trainers, planners and label managers by name with
``nnunetv2.utilities.find_class_by_name.recursive_find_python_class``, which only walks nnunetv2's
own folders. A ``.pth`` file installed next to this package calls :func:`install` at interpreter
start-up (in every process, nnU-Net's spawned workers included). We cannot patch nnunetv2 there:
importing it would import torch in every Python process. Instead a meta-path finder waits until
the lookup module is first imported and wraps the function before any other module binds it.

Two more things are wrapped the same way. ``nnUNetv2_plan_and_preprocess`` extracts the dataset
fingerprint before it creates the planner, so with ``-pl DSM...`` the DSM planners' data checks
(``nnunetv2_dsm check``) run at fingerprinting, before nnU-Net reads any case. And in processes that
use nnU-Net's lookup, an uncaught ``DSMError`` is printed as its message without a traceback, as the
``nnunetv2_dsm`` command does (``DSM_DEBUG=1`` shows the traceback).

This module must stay standard-library only and cheap.
"""

import importlib.abc
import importlib.machinery
import os
import sys

_TARGET = "nnunetv2.utilities.find_class_by_name"
# nnUNetv2_plan_and_preprocess extracts the dataset fingerprint before it creates the planner.
_FINGERPRINT = "nnunetv2.experiment_planning.plan_and_preprocess_api"
# Where to look for a DSM class that nnU-Net's own package (the key) does not hold.
_COUNTERPARTS = {
    "nnunetv2.training.nnUNetTrainer": "nnunetv2_dsm.trainers",
    "nnunetv2.experiment_planning": "nnunetv2_dsm.planners",
    "nnunetv2.utilities.label_handling": "nnunetv2_dsm.label_handling",
}
# Our classes start with DSM; method classes of other papers are named after the paper.
_PREFIXES = ("DSM", "SDSeg", "DiffuGTS")


def _wrap(original):
    def recursive_find_python_class(folder, class_name, current_module, *args, **kwargs):
        found = original(folder, class_name, current_module, *args, **kwargs)
        if found is not None or not class_name.startswith(_PREFIXES):
            return found
        import importlib
        import os

        counterpart = _COUNTERPARTS.get(current_module)
        for package_name in [counterpart] if counterpart else _COUNTERPARTS.values():
            package = importlib.import_module(package_name)
            found = original(os.path.dirname(package.__file__), class_name, package_name)
            if found is not None:
                return found
        return None

    recursive_find_python_class.__wrapped__ = original
    recursive_find_python_class.__doc__ = original.__doc__
    return recursive_find_python_class


def _excepthook(previous):
    """Print an uncaught ``DSMError`` as its message alone (``DSM_DEBUG=1``: with the traceback)."""

    def excepthook(exc_type, exc, tb):
        from nnunetv2_dsm import settings
        from nnunetv2_dsm.errors import DSMError

        if isinstance(exc, DSMError) and not settings.debug():
            sys.stderr.write(f"error: {exc}\n(set DSM_DEBUG=1 to see the traceback)\n")
            return
        previous(exc_type, exc, tb)

    excepthook.__dsm__ = True
    return excepthook


def _patch(module) -> None:
    current = module.recursive_find_python_class
    if not hasattr(current, "__wrapped__"):
        module.recursive_find_python_class = _wrap(current)
    # The stock commands (nnUNetv2_plan_and_preprocess, nnUNetv2_train, ...) let our errors through
    # uncaught: show them the way the nnunetv2_dsm command does, as a message without a traceback.
    if not getattr(sys.excepthook, "__dsm__", False):
        sys.excepthook = _excepthook(sys.excepthook)


def planner_from_argv(argv: list[str]) -> str | None:
    """The experiment planner a stock nnU-Net command line asks for (``-pl NAME``), if any."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-pl":
            return argv[i + 1]
    return None


def _check_first(original):
    def extract_fingerprint_dataset(dataset_id, *args, **kwargs):
        planner = planner_from_argv(sys.argv)
        if planner is not None and planner.startswith(_PREFIXES):
            # The DSM planners' data checks, before nnU-Net's fingerprinting reads (and may crash on or
            # silently accept) a bad case.
            from nnunetv2.paths import nnUNet_raw
            from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

            from nnunetv2_dsm.planners.dsm_planner import check_before_planning

            if nnUNet_raw is not None:  # unset: nnU-Net's own lookup below reports it
                check_before_planning(os.path.join(nnUNet_raw, convert_id_to_dataset_name(dataset_id)))
        return original(dataset_id, *args, **kwargs)

    extract_fingerprint_dataset.__wrapped__ = original
    return extract_fingerprint_dataset


def _patch_fingerprint(module) -> None:
    if not hasattr(module.extract_fingerprint_dataset, "__wrapped__"):
        module.extract_fingerprint_dataset = _check_first(module.extract_fingerprint_dataset)


_PATCHES = {_TARGET: _patch, _FINGERPRINT: _patch_fingerprint}


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, _PATCHES[fullname])
        return spec


def install() -> None:
    """Idempotent: patch now if nnU-Net's lookup module is loaded, else when it is first imported."""
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not all(name in sys.modules for name in _PATCHES) and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
