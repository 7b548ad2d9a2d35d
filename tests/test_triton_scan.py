"""The Triton selective scan against mamba-ssm's ``selective_scan_ref``, and the choice of scan backend.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), the
same kernel source that compiles on a GPU.
"""

import os

import pytest
import torch
from test_ssm import assert_parity, make_inputs

from nnunetv2_dsm.networks import ssm
from nnunetv2_dsm.networks.ssm import SCAN_BACKEND_VARIABLE, scan_backend, selective_scan

pytest.importorskip("triton", reason="Triton is not installed (it ships with PyTorch's CUDA wheels)")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="no CUDA device and TRITON_INTERPRET is not 1"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, dim, d_state, length, groups), make_inputs options; lengths span one, several and partial chunks
CASES = [
    ((2, 4, 4, 150, None), {}),
    ((1, 4, 3, 70, 2), {"with_d": False, "with_z": False}),
    ((1, 2, 16, 200, 1), {"with_bias": False, "softplus": False}),
    ((2, 2, 4, 1, None), {}),
    ((1, 2, 4, 130, None), {"delta_shift": 3.0}),  # fast decay: state forgotten within a chunk
]


@pytest.fixture
def on_device():
    def move(inputs):
        return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return move


@pytest.mark.parametrize(("shape", "options"), CASES)
def test_triton_parity_with_mamba_reference(reference, on_device, shape, options):
    batch, dim, d_state, length, groups = shape
    inputs = on_device(make_inputs(batch, dim, d_state, length, groups, **options))
    assert_parity(reference, inputs, rtol=2e-4, backend="triton")


def test_triton_scan_under_autocast_keeps_float32_state(reference, on_device):
    """Under bfloat16 autocast the operands arrive in bfloat16 but the state accumulates in float32."""
    inputs = on_device(make_inputs(1, 4, 8, 300, None, seed=3))
    low = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
           for k, v in inputs.items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = selective_scan(**low, backend="triton")
    assert y.dtype == torch.bfloat16
    expected = reference(**{k: v.float() if torch.is_tensor(v) else v for k, v in low.items()})
    # only the final rounding to bfloat16 separates the two (relative error 2^-8)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_triton_matches_the_other_backends_with_gradients(on_device):
    inputs = on_device(make_inputs(2, 4, 4, 100, None, seed=5))
    outputs = {}
    for backend in ("triton", "torch"):
        leaves = {k: v.clone().requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}
        y = selective_scan(**leaves, backend=backend)
        y.square().sum().backward()
        outputs[backend] = (y.detach(), leaves["A"].grad, leaves["delta"].grad)
    for ours, theirs in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.fixture
def fresh_choice(monkeypatch):
    scan_backend.cache_clear()
    yield monkeypatch
    scan_backend.cache_clear()


def test_backend_choice_follows_the_environment(fresh_choice):
    fresh_choice.delenv(SCAN_BACKEND_VARIABLE, raising=False)
    expected_cpu = "compiled" if ssm.cpu_kernels.load_kernels() is not None else "torch"
    assert scan_backend("cpu") == expected_cpu
    fresh_choice.setenv(SCAN_BACKEND_VARIABLE, "torch")
    scan_backend.cache_clear()
    assert scan_backend("cpu") == "torch"
    fresh_choice.setenv(SCAN_BACKEND_VARIABLE, "triton")
    scan_backend.cache_clear()
    assert scan_backend("cpu") == "triton"  # interpreted here; the test module is skipped otherwise


def test_forced_backend_that_cannot_run_is_an_error(fresh_choice):
    fresh_choice.setenv(SCAN_BACKEND_VARIABLE, "mamba")
    if torch.cuda.is_available() and ssm._fused_selective_scan() is not None:
        pytest.skip("mamba-ssm's CUDA kernel is available here")
    with pytest.raises(RuntimeError, match="mamba-ssm.*unset DSM_SCAN_BACKEND"):
        scan_backend("cuda")
    fresh_choice.setenv(SCAN_BACKEND_VARIABLE, "fastest")
    scan_backend.cache_clear()
    with pytest.raises(ValueError, match="'fastest' is not one of auto, mamba, triton, compiled, torch"):
        scan_backend("cpu")


def test_cuda_without_mamba_chooses_triton(fresh_choice):
    fresh_choice.delenv(SCAN_BACKEND_VARIABLE, raising=False)
    fresh_choice.setattr(ssm, "_fused_selective_scan", lambda: None)
    assert scan_backend("cuda") == "triton"


COMPILE_FOR_GPUS = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nnunetv2_dsm.networks import triton_scan

for capability in (80, 90):  # A100, H100/H200
    for fn in (triton_scan._scan_fwd_kernel, triton_scan._scan_bwd_kernel):
        constexprs = {"BLOCK_N": 16, "CHUNK_T": triton_scan.CHUNK}
        signature = {name: "constexpr" if name in constexprs else "*fp32" if name.endswith("_ptr") else "i32"
                     for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", capability, 32))
        assert "cubin" in kernel.asm, (fn.__name__, capability)
        print(fn.__name__, capability, "ok")
"""


def test_triton_kernels_compile_for_cuda_gpus():
    """The kernels the interpreter checks here also compile to GPU code (PTX and cubin via the ptxas that
    ships with Triton) for the A100 and H100/H200 architectures; no GPU is needed to compile."""
    import subprocess
    import sys

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS], env=env, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == 4
