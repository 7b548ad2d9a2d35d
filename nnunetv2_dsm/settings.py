"""Every setting DSM reads from the environment, and the cache folder, in one place (standard library only).

| variable | effect |
|---|---|
| ``DSM_CACHE`` | cache folder (example CT, compiled CPU kernels); default ``$XDG_CACHE_HOME/nnunetv2_dsm`` |
| ``DSM_SEED`` | seed Python, NumPy and torch for repeatable CPU training |
| ``DSM_SKIP_CHECKS=1`` | DSM planners skip the raw-data file checks (datasets already checked) |
| ``DSM_SCAN_BACKEND`` | force the selective scan: ``mamba``, ``triton``, ``compiled`` or ``torch`` |
| ``DSM_CPU_KERNELS=0`` | do not build or use the compiled CPU kernels |
| ``DSM_DEBUG=1`` | stock nnU-Net commands show the traceback of DSM errors |
| ``DSM_CLIP_WEIGHTS`` | local file (or hub tag) of the OpenCLIP text encoder's weights |
| ``DSM_TEXT_ENCODER`` | text encoder of stage-2 training (overrides the trainer's ``text_encoder_spec``) |
| ``DSM_BENCHMARK_EPOCHS``, ``DSM_BENCHMARK_ITERATIONS`` | budget of the learning benchmark's trainers |
| ``DSM_SDSEG_AUTOENCODER`` | local diffusers ``AutoencoderKL`` folder (LDM/SD kl-f8) for ``SDSegTrainer`` |
| ``DSM_SDSEG_NOISE_SEED`` | seed of SDSeg's starting noise at prediction (default: the plans' ``noise_seed``) |
| ``DSM_SDSEG_INFERENCE_STEPS`` | SDSeg's reverse steps at prediction: 1 (single step, default) or DDIM steps |
"""

import os
from pathlib import Path

CACHE_VARIABLE = "DSM_CACHE"
SEED_VARIABLE = "DSM_SEED"
SKIP_CHECKS_VARIABLE = "DSM_SKIP_CHECKS"
SCAN_BACKEND_VARIABLE = "DSM_SCAN_BACKEND"
CPU_KERNELS_VARIABLE = "DSM_CPU_KERNELS"
DEBUG_VARIABLE = "DSM_DEBUG"
CLIP_WEIGHTS_VARIABLE = "DSM_CLIP_WEIGHTS"
TEXT_ENCODER_VARIABLE = "DSM_TEXT_ENCODER"
BENCHMARK_EPOCHS_VARIABLE = "DSM_BENCHMARK_EPOCHS"
BENCHMARK_ITERATIONS_VARIABLE = "DSM_BENCHMARK_ITERATIONS"
SDSEG_AUTOENCODER_VARIABLE = "DSM_SDSEG_AUTOENCODER"
SDSEG_NOISE_SEED_VARIABLE = "DSM_SDSEG_NOISE_SEED"
SDSEG_INFERENCE_STEPS_VARIABLE = "DSM_SDSEG_INFERENCE_STEPS"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_VARIABLE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nnunetv2_dsm"
    )
    return Path(root)


def seed() -> int | None:
    value = os.environ.get(SEED_VARIABLE)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_VARIABLE} must be an integer, got {value!r}") from None


def skip_checks() -> bool:
    return os.environ.get(SKIP_CHECKS_VARIABLE, "0").strip() == "1"


def cpu_kernels_enabled() -> bool:
    return os.environ.get(CPU_KERNELS_VARIABLE, "1") != "0"


def scan_backend_override() -> str | None:
    return os.environ.get(SCAN_BACKEND_VARIABLE) or None


def debug() -> bool:
    return bool(os.environ.get(DEBUG_VARIABLE))


def clip_weights() -> str | None:
    return os.environ.get(CLIP_WEIGHTS_VARIABLE) or None


def text_encoder_override() -> str | None:
    return os.environ.get(TEXT_ENCODER_VARIABLE) or None


def benchmark_budget(epochs: int, iterations: int) -> tuple[int, int]:
    """(epochs, iterations per epoch) of the learning benchmark, the defaults unless set."""
    return (int(os.environ.get(BENCHMARK_EPOCHS_VARIABLE, epochs)),
            int(os.environ.get(BENCHMARK_ITERATIONS_VARIABLE, iterations)))


def sdseg_autoencoder() -> str | None:
    """Local pretrained mask autoencoder for SDSeg (a diffusers ``AutoencoderKL`` folder), if given."""
    value = os.environ.get(SDSEG_AUTOENCODER_VARIABLE, "").strip()
    return value or None


def _integer(variable: str, default: int, minimum: int) -> int:
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{variable} must be an integer of at least {minimum}, got {value!r}")
    return number


def sdseg_noise_seed(default: int) -> int:
    return _integer(SDSEG_NOISE_SEED_VARIABLE, default, 0)


def sdseg_inference_steps(default: int) -> int:
    return _integer(SDSEG_INFERENCE_STEPS_VARIABLE, default, 1)
