import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nnunetv2_dsm.networks import cpu_kernels
from nnunetv2_dsm.networks.cpu_kernels import load_kernels, selective_scan
from nnunetv2_dsm.networks.dqr import GuidedFeatureDiffusion

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                reason="no C compiler: the compiled CPU kernels are unavailable")


def stepwise(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    # u, delta, z: (b, D, L), A: (D, N), B, C: (b, G, N, L): the recurrence written out in float64
    batch, dim, length = u.shape
    heads = dim // B.shape[1]
    Bd, Cd = B.repeat_interleave(heads, 1).double(), C.repeat_interleave(heads, 1).double()
    delta = delta.double() + (0 if delta_bias is None else delta_bias.double().unsqueeze(-1))
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        dt = delta[..., t].unsqueeze(-1)
        h = torch.exp(dt * A.double()) * h + dt * u[..., t].double().unsqueeze(-1) * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + u.double() * D.double().unsqueeze(-1)
    return y if z is None else y * torch.nn.functional.silu(z.double())


def random_inputs(batch, dim, d_state, length, groups, dtype=torch.float32, seed=0, full=False):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    args = (randn(batch, dim, length), torch.nn.functional.softplus(randn(batch, dim, length) - 2),
            -torch.rand(dim, d_state, generator=gen, dtype=dtype) * 4, randn(batch, groups, d_state, length),
            randn(batch, groups, d_state, length))
    if not full:
        return args, {}
    # raw delta around -3 with biases spread over [-4, 26]: softplus on both sides of its threshold of 20
    return args[:1] + (randn(batch, dim, length) - 3,) + args[2:], {
        "D": randn(dim), "z": randn(batch, dim, length), "delta_bias": torch.linspace(-4, 26, dim, dtype=dtype),
        "delta_softplus": True}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "dim", "d_state", "length", "groups"),
                         [(1, 1, 1, 1, 1), (2, 6, 5, 40, 3), (1, 4, 33, 17, 2), (3, 2, 16, 64, 1)])
@pytest.mark.parametrize("full", [False, True], ids=["scan", "with_D_z_bias_softplus"])
def test_kernel_equals_the_recurrence(dtype, batch, dim, d_state, length, groups, full):
    args, options = random_inputs(batch, dim, d_state, length, groups, dtype, full=full)
    y = selective_scan(load_kernels(), *args, **options)
    assert y.shape == (batch, dim, length) and y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    expected = stepwise(*args, **options)
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * max(1.0, expected.abs().max().item()))


def test_thread_split_gives_the_same_result():
    inputs, options = random_inputs(2, 16, 16, 4096, 2, seed=1, full=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = selective_scan(load_kernels(), *inputs, **options)
        torch.set_num_threads(4)  # more workers than cores is fine: rows are only split
        split = selective_scan(load_kernels(), *inputs, **options)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, split)


def test_non_contiguous_inputs():
    (u, delta, A, B, C), _ = random_inputs(2, 4, 8, 30, 1, seed=2)
    expected = selective_scan(load_kernels(), u, delta, A, B, C)
    u_t = u.transpose(0, 1).contiguous().transpose(0, 1)
    B_t = B.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not u_t.is_contiguous() and not B_t.is_contiguous()
    assert torch.equal(selective_scan(load_kernels(), u_t, delta, A, B_t, C), expected)


def run_python(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ | env, timeout=300)


def test_compiled_once_into_the_cache_and_denormals_survive(tmp_path):
    # Linking with -ffast-math would switch the process to flush-denormals-to-zero on load.
    script = """
        import json, torch
        from nnunetv2_dsm.networks.cpu_kernels import library_path, load_kernels
        tiny = torch.tensor([1e-40]) * 1.0
        lib = load_kernels()
        print(json.dumps({"loaded": lib is not None, "path": str(library_path()),
                          "denormal_kept": bool((torch.tensor([1e-40]) * 1.0).item() != 0.0),
                          "denormal_before": bool(tiny.item() != 0.0)}))
    """
    first = run_python(script, DSM_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["loaded"] and report["denormal_before"] and report["denormal_kept"], report
    library = Path(report["path"])
    assert library.is_file() and library.parent == tmp_path / "kernels"
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # no temporary debris
    stamp = library.stat().st_mtime_ns
    second = run_python(script, DSM_CACHE=str(tmp_path), CC="/nonexistent/cc")
    assert second.returncode == 0 and json.loads(second.stdout.strip().splitlines()[-1])["loaded"], second.stderr
    assert library.stat().st_mtime_ns == stamp


def test_without_a_compiler_the_pytorch_scan_takes_over(tmp_path):
    script = """
        import warnings, torch
        from nnunetv2_dsm.networks.cpu_kernels import load_kernels
        from nnunetv2_dsm.networks.ssm import selective_scan
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert load_kernels() is None
        assert any("C compiler" in str(w.message) for w in caught), [str(w.message) for w in caught]
        u = torch.randn(1, 2, 50)
        with torch.no_grad():
            y = selective_scan(u, torch.rand(1, 2, 50), -torch.ones(2, 3), torch.randn(1, 3, 50), torch.randn(1, 3, 50))
        assert y.shape == (1, 2, 50) and torch.isfinite(y).all()
        print("ok")
    """
    result = run_python(script, DSM_CACHE=str(tmp_path), CC="/nonexistent/cc")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert not list((tmp_path / "kernels").iterdir())


def test_disabled_by_environment(tmp_path):
    result = run_python("from nnunetv2_dsm.networks.cpu_kernels import load_kernels; print(load_kernels() is None)",
                        DSM_CACHE=str(tmp_path), DSM_CPU_KERNELS="0")
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
    assert not (tmp_path / "kernels").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("spatial", "kernel_size"), [((5, 6), 3), ((4, 5, 6), 3), ((3, 4, 7), 5), ((1, 1, 1), 3)])
def test_diffusion_kernels_equal_the_pytorch_steps(monkeypatch, dtype, spatial, kernel_size):
    torch.manual_seed(0)
    module = GuidedFeatureDiffusion(6, 5, steps=2, kernel_size=kernel_size).to(dtype)
    f = torch.randn(2, 6, *spatial, dtype=dtype)
    guide = torch.randn(2, 5, *spatial, dtype=dtype)
    with torch.no_grad():
        compiled = (module.neighbourhood_weights(guide), module(f, guide))
        monkeypatch.setattr(cpu_kernels, "load_kernels", lambda: None)
        reference = (module.neighbourhood_weights(guide), module(f, guide))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for ours, theirs in zip(compiled, reference):
        assert ours.shape == theirs.shape and ours.dtype == dtype
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def test_diffusion_kernels_not_used_when_gradients_are_wanted(monkeypatch):
    module = GuidedFeatureDiffusion(4, 4)
    f = torch.randn(1, 4, 5, 5, 5, requires_grad=True)
    calls = []
    monkeypatch.setattr(cpu_kernels, "diffusion_step", lambda *a: calls.append(a))
    monkeypatch.setattr(cpu_kernels, "neighbour_cosine", lambda *a: calls.append(a))
    module(f).sum().backward()
    assert not calls and f.grad is not None and module.step_logit.grad is not None


def test_kernels_run_split_in_a_forked_child():
    # The parent's thread pool exists before the fork; the child must not wait on its dead threads.
    # Tensors are made so that no torch op runs multi-threaded (libgomp itself hangs in forked children
    # of a process that used it): B and C come channels-last already, so the kernel wrapper copies nothing.
    script = """
        import multiprocessing, torch
        from nnunetv2_dsm.networks import cpu_kernels
        from nnunetv2_dsm.networks.cpu_kernels import load_kernels, selective_scan
        torch.set_num_threads(1)
        length, d_state = 8192, 64
        u, delta = torch.randn(1, 2, length), torch.rand(1, 2, length)
        A = -torch.rand(2, d_state)
        B, C = (torch.randn(1, 1, length, d_state).transpose(-1, -2) for _ in range(2))
        torch.set_num_threads(2)
        expected = selective_scan(load_kernels(), u, delta, A, B, C)
        assert cpu_kernels._thread_pool.cache_info().currsize == 1  # the split really ran on a pool

        def child(queue):
            queue.put(bool(torch.equal(selective_scan(load_kernels(), u, delta, A, B, C), expected)))

        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        process = ctx.Process(target=child, args=(queue,), daemon=True)
        process.start()
        print(queue.get(timeout=60))
    """
    result = run_python(script)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


def test_a_compiler_without_march_native_still_builds_the_kernels(tmp_path):
    wrapper = tmp_path / "cc-no-native"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    script = """
        import torch
        from nnunetv2_dsm.networks.cpu_kernels import load_kernels, selective_scan
        u, delta = torch.randn(1, 2, 30), torch.rand(1, 2, 30)
        y = selective_scan(load_kernels(), u, delta, -torch.ones(2, 3), torch.zeros(1, 1, 3, 30),
                           torch.zeros(1, 1, 3, 30), D=torch.ones(2))
        print(torch.equal(y, u))
    """
    result = run_python(script, DSM_CACHE=str(tmp_path / "cache"), CC=str(wrapper))
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
