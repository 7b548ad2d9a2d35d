"""Make nnU-Net's class lookups find DSM classes.

nnU-Net resolves trainers, planners and label managers by name with
``nnunetv2.utilities.find_class_by_name.recursive_find_python_class``, which only walks nnunetv2's
own folders. A ``.pth`` file installed next to this package calls :func:`install` at interpreter
start-up (in every process, nnU-Net's spawned workers included). We cannot patch nnunetv2 there:
importing it would import torch in every Python process. Instead a meta-path finder waits until
the lookup module is first imported and wraps the function before any other module binds it.

This module must stay standard-library only and cheap.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "nnunetv2.utilities.find_class_by_name"
# Where to look for a DSM class that nnU-Net's own package (the key) does not hold.
_COUNTERPARTS = {
    "nnunetv2.training.nnUNetTrainer": "nnunetv2_dsm.trainers",
    "nnunetv2.experiment_planning": "nnunetv2_dsm.planners",
    "nnunetv2.utilities.label_handling": "nnunetv2_dsm.label_handling",
}


def _wrap(original):
    def recursive_find_python_class(folder, class_name, current_module, *args, **kwargs):
        found = original(folder, class_name, current_module, *args, **kwargs)
        if found is not None or not class_name.startswith("DSM"):
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


def _patch(module) -> None:
    current = module.recursive_find_python_class
    if not hasattr(current, "__wrapped__"):
        module.recursive_find_python_class = _wrap(current)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Idempotent: patch now if nnU-Net's lookup module is loaded, else when it is first imported."""
    if _TARGET in sys.modules:
        _patch(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
