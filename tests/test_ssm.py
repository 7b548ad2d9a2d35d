import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nnunetv2_dsm.networks.cpu_kernels import load_kernels
from nnunetv2_dsm.networks.ssm import SSM, selective_scan

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["kernel", "torch"])
def no_grad_path(request):
    """selective_scan options running a test once with the compiled CPU kernel, once with the PyTorch scan."""
    if request.param == "kernel" and load_kernels() is None:
        pytest.skip("no C compiler: the compiled CPU scan is unavailable")
    return {"cpu_kernel": request.param == "kernel"}


# The same two paths with gradients: the compiled forward/adjoint kernels, or the chunked PyTorch scan.
grad_path = no_grad_path


def make_inputs(batch, dim, d_state, length, groups=None, *, with_d=True, with_z=True, with_bias=True,
                softplus=True, delta_shift=-1.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    delta = randn(batch, dim, length) * 0.5 + delta_shift
    if not softplus:
        delta = torch.nn.functional.softplus(delta)
    return {
        "u": randn(batch, dim, length),
        "delta": delta,
        "A": -(torch.rand(dim, d_state, generator=gen, dtype=dtype) * 8 + 0.5),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim) if with_d else None,
        "z": randn(batch, dim, length) if with_z else None,
        "delta_bias": randn(dim) * 0.1 if with_bias else None,
        "delta_softplus": softplus,
    }


def leaf_copies(inputs):
    return {k: v.clone().requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}


def assert_parity(reference, inputs, rtol=1e-4, **options):
    ref_in, our_in = leaf_copies(inputs), leaf_copies(inputs)
    expected = reference(**ref_in)
    actual = selective_scan(**our_in, **options)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)
    grad_out = torch.randn_like(expected)
    (expected * grad_out).sum().backward()
    (actual * grad_out).sum().backward()
    for name, value in ref_in.items():
        if torch.is_tensor(value):
            g_ref, g_our = value.grad, our_in[name].grad
            assert g_our is not None, name
            torch.testing.assert_close(g_our, g_ref, rtol=rtol, atol=rtol * g_ref.abs().max().item(), msg=name)


# (batch, dim, d_state, length, groups), make_inputs options
PARITY_CASES = [
    ((2, 8, 4, 100, None), {}),
    ((1, 6, 16, 257, 2), {}),
    ((2, 8, 8, 130, 4), {"with_d": False, "with_z": False}),
    ((1, 5, 3, 70, None), {"with_bias": False, "softplus": False}),
    ((2, 4, 16, 1, None), {}),
]
FAST_DECAY_CASE = ((1, 4, 8, 300, None), {"delta_shift": 3.0})
LONG_CASE = ((1, 3, 4, 12_000, 1), {"seed": 1})


@pytest.mark.parametrize(("shape", "options"), PARITY_CASES)
def test_parity_with_mamba_reference(reference, grad_path, shape, options):
    batch, dim, d_state, length, groups = shape
    assert_parity(reference, make_inputs(batch, dim, d_state, length, groups, **options), **grad_path)


@pytest.mark.parametrize(("shape", "options"), [*PARITY_CASES, FAST_DECAY_CASE, LONG_CASE])
def test_no_grad_parity_with_mamba_reference(reference, no_grad_path, shape, options):
    batch, dim, d_state, length, groups = shape
    inputs = make_inputs(batch, dim, d_state, length, groups, **options)
    expected = reference(**inputs)
    with torch.no_grad():
        actual = selective_scan(**inputs, **no_grad_path)
    torch.testing.assert_close(actual, expected, rtol=2e-4, atol=2e-4 * expected.abs().max().item())


def test_parity_with_fast_decay_splits_chunks(reference, grad_path):
    # delta ~ 3 with |A| up to 8.5 decays by ~2^-35 per step: chunks must be split to stay finite.
    (batch, dim, d_state, length, groups), options = FAST_DECAY_CASE
    assert_parity(reference, make_inputs(batch, dim, d_state, length, groups, **options), **grad_path)


def test_parity_long_sequence(reference, grad_path):
    (batch, dim, d_state, length, groups), options = LONG_CASE
    assert_parity(reference, make_inputs(batch, dim, d_state, length, groups, **options), rtol=2e-4, **grad_path)


def test_training_kernel_gradients_do_not_depend_on_the_thread_split():
    if load_kernels() is None:
        pytest.skip("no C compiler: the compiled CPU scan is unavailable")
    inputs = make_inputs(2, 16, 8, 4_000, 2)
    grads = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        leaves = leaf_copies(inputs)
        out = selective_scan(**leaves)
        out.square().sum().backward()
        grads.append([v.grad for v in leaves.values() if torch.is_tensor(v)])
    for one, two in zip(*grads):
        # dA, dB and dC sum per-thread buffers: equal up to the order of float additions.
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5 * one.abs().max().item())


def test_chunked_equals_stepwise_recurrence_float64():
    # chunk_size=1 is the plain recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t.
    inputs = make_inputs(2, 6, 5, 300, 3, dtype=torch.float64, delta_shift=0.0)
    chunked = selective_scan(**inputs, chunk_size=64, cpu_kernel=False)
    stepwise = selective_scan(**inputs, chunk_size=1, cpu_kernel=False)
    assert chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, stepwise, rtol=1e-10, atol=1e-10)


def test_half_precision_inputs_keep_dtype(reference):
    inputs = make_inputs(1, 4, 4, 50, with_bias=False)
    half = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and k != "A" else v for k, v in inputs.items()}
    out = selective_scan(**half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(**half).float(), rtol=1e-2, atol=1e-2)


def test_bad_shapes_raise_clear_errors():
    inputs = make_inputs(1, 6, 4, 10)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**(inputs | {"B": torch.randn(1, 4, 4, 10)}))  # 4 groups do not divide 6 channels
    with pytest.raises(ValueError, match="A must be real"):
        selective_scan(**(inputs | {"A": inputs["A"].to(torch.complex64)}))
    with pytest.raises(ValueError, match="delta shape"):
        selective_scan(**(inputs | {"delta": torch.randn(1, 6, 9)}))


def test_block_matches_mamba_parameter_layout(reference):
    from mamba_ssm.modules.mamba_simple import Mamba

    ours = SSM(24, d_state=8, d_conv=3, expand=2)
    theirs = Mamba(24, d_state=8, d_conv=3, expand=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.A_log, torch.log(torch.arange(1, 9.0)).repeat(48, 1))
    dt = torch.nn.functional.softplus(ours.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize("d_model", [1, 3, 45])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_block_shapes_and_gradients(d_model, bidirectional):
    torch.manual_seed(0)
    block = SSM(d_model, bidirectional=bidirectional)
    x = torch.randn(2, 37, d_model, requires_grad=True)
    out = block(x)
    assert out.shape == (2, 37, d_model)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    if bidirectional:
        assert {"conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b"} <= set(block.state_dict())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_block_causality(bidirectional):
    torch.manual_seed(0)
    block = SSM(4, bidirectional=bidirectional).eval()
    x = torch.randn(1, 50, 4)
    x_changed = x.clone()
    x_changed[:, 30:] += 1.0
    with torch.no_grad():
        diff = (block(x) - block(x_changed)).abs()[0].amax(-1)
    assert diff[30:].min() > 0
    # A chunk's reference point sees the whole chunk, so the past moves by rounding only.
    if bidirectional:
        assert diff[:30].max() > 1e-4
    else:
        assert diff[:30].max() < 1e-6


def test_block_runs_long_sequence():
    block = SSM(3, bidirectional=True).eval()
    with torch.no_grad():
        out = block(torch.randn(1, 100_000, 3))
    assert out.shape == (1, 100_000, 3) and torch.isfinite(out).all()


def test_long_scan_memory_is_bounded():
    # The sequential reference holds several (batch, dim, L, d_state) float32 tensors, 410 MB each at these
    # sizes; the chunked scan needs O(batch * dim * L) memory only and must stay below one of them.
    script = textwrap.dedent("""
        import json, resource, torch
        from nnunetv2_dsm.networks.ssm import selective_scan
        torch.set_num_threads(1)
        b, d, n, L = 1, 64, 16, 100_000
        g = torch.Generator().manual_seed(0)
        args = dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) * 0.1 - 4,
                    A=-torch.arange(1, n + 1.0).repeat(d, 1), B=torch.randn(b, n, L, generator=g),
                    C=torch.randn(b, n, L, generator=g), D=torch.ones(d), z=torch.randn(b, d, L, generator=g),
                    delta_softplus=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            y = selective_scan(**args)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"peak_increase_mb": (after - before) / 1024, "finite": bool(torch.isfinite(y).all())}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["finite"]
    full_state_mb = 64 * 16 * 100_000 * 4 / 2**20
    assert report["peak_increase_mb"] < full_state_mb, report
    assert math.isfinite(report["peak_increase_mb"])


def test_inference_and_training_paths_agree(no_grad_path):
    inputs = make_inputs(2, 8, 16, 3000, 2, seed=3)
    with torch.no_grad():
        inference = selective_scan(**inputs, **no_grad_path)
    training = selective_scan(**leaf_copies(inputs))
    assert training.requires_grad
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-5 * inference.abs().max().item())


def test_training_kernel_takes_non_contiguous_output_gradients(reference):
    """The output gradient of a flipped or transposed consumer arrives non-contiguous."""
    inputs = make_inputs(3, 10, 16, 1024, None)
    ref_in, our_in = leaf_copies(inputs), leaf_copies(inputs)
    weight = torch.randn(1024, 3, 10).permute(1, 2, 0)  # a non-contiguous gradient of the same shape as y
    (reference(**ref_in) * weight).sum().backward()
    (selective_scan(**our_in) * weight).sum().backward()
    for name in ("u", "delta", "A", "B", "C"):
        g_ref = ref_in[name].grad
        torch.testing.assert_close(our_in[name].grad, g_ref, rtol=2e-4, atol=2e-4 * g_ref.abs().max().item(), msg=name)
