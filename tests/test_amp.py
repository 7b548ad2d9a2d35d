"""Mixed precision: whole DSM training steps under autocast, and each float32 island on its own.

nnU-Net trains under ``torch.autocast`` on CUDA (float16). bfloat16 autocast on CPU runs the same
reduced-precision code paths here; float16 autocast on CPU is used where overflow is the risk.
"""

import pytest
import torch
import torch.nn.functional as F
from test_networks import build
from test_ssm import make_inputs
from test_stage2 import _tiny_network

from nnunetv2_dsm.losses import ClassPresenceBCE, PartialLabelDeepSupervision, PartialLabelDiceBCELoss
from nnunetv2_dsm.networks.alignment import TextAlignmentHead
from nnunetv2_dsm.networks.kmmm import KMeansClusterUpdate
from nnunetv2_dsm.networks.ssm import SCAN_BACKEND_VARIABLE, scan_backend, selective_scan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_scan_choice():
    """The scan backend is chosen once per process; tests that force one start and end with a new choice."""
    scan_backend.cache_clear()
    yield
    scan_backend.cache_clear()


def _targets(outputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(o.shape, generator=generator) > 0.7).float() for o in outputs]


def _assert_finite_step(net: torch.nn.Module, loss: torch.Tensor) -> None:
    assert torch.isfinite(loss), loss
    loss.backward()
    bad = [n for n, p in net.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    ssm = [p.grad for n, p in net.named_parameters() if n.endswith("ssm.A_log")]
    assert ssm and all(g is not None and g.abs().sum() > 0 for g in ssm), "an SSM received no gradient"


# (device, autocast dtype, scan backend): bfloat16 on CPU as the proxy; float16 and bfloat16 on CUDA when present
SETTINGS = [("cpu", torch.bfloat16, "compiled"), ("cpu", torch.bfloat16, "torch")]
if torch.cuda.is_available():
    SETTINGS += [("cuda", torch.float16, "auto"), ("cuda", torch.bfloat16, "auto")]


def _setting(monkeypatch, device: str, scan: str) -> None:
    from nnunetv2_dsm.networks.cpu_kernels import load_kernels
    if scan == "compiled" and load_kernels() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv(SCAN_BACKEND_VARIABLE, scan)


@pytest.mark.parametrize(("device", "dtype", "scan"), SETTINGS, ids=str)
def test_stage1_training_step_under_autocast_is_finite(device, dtype, scan, monkeypatch, fresh_scan_choice):
    _setting(monkeypatch, device, scan)
    net, _, patch = build(2)
    net = net.to(device)
    net.deep_supervision = True
    loss_fn = PartialLabelDeepSupervision(PartialLabelDiceBCELoss())
    x = torch.randn(2, 1, *patch, device=device)
    with torch.autocast(device, dtype=dtype):
        outputs, extras = net(x, return_extras=True)
        assert outputs[0].dtype == dtype  # the network really ran in reduced precision
        available = torch.ones(2, outputs[0].shape[1], dtype=torch.bool, device=device)
        targets = [t.to(device) for t in _targets(outputs)]
        loss = loss_fn(outputs, targets, available) + ClassPresenceBCE()(extras["class_logits"], targets[0], available)
    _assert_finite_step(net, loss)


@pytest.mark.parametrize(("device", "dtype", "scan"), SETTINGS, ids=str)
def test_stage2_training_step_under_autocast_is_finite(device, dtype, scan, monkeypatch, fresh_scan_choice):
    _setting(monkeypatch, device, scan)
    net = _tiny_network(deep_supervision=True).to(device)
    net.tumour_decoder.text_embeddings.copy_(F.normalize(torch.randn(4, 8), dim=1))
    x = torch.randn(2, 1, 8, 16, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        outputs, extras = net(x, return_extras=True)
        available = torch.ones(2, outputs[0].shape[1], dtype=torch.bool, device=device)
        targets = [t.to(device) for t in _targets(outputs, seed=1)]
        loss = PartialLabelDeepSupervision(PartialLabelDiceBCELoss())(outputs, targets, available)
        loss = loss + ClassPresenceBCE()(extras["class_logits"], targets[0], available)
    _assert_finite_step(net, loss)


# ---------------------------------------------------------------- float32 islands


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_scan_state_accumulates_in_float32_under_autocast(backend):
    from nnunetv2_dsm.networks.cpu_kernels import load_kernels
    if backend == "compiled" and load_kernels() is None:
        pytest.skip("no C compiler")
    inputs = make_inputs(1, 4, 8, 3000, None, seed=2, delta_shift=-4.0)  # slow decay: long memory
    low = {k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan(**low, backend=backend)
    expected = selective_scan(**{k: v.float() if torch.is_tensor(v) else v for k, v in low.items()}, backend="torch")
    assert y.dtype == torch.bfloat16
    # only the final rounding to bfloat16 separates them; a bfloat16 state would drift over 3000 steps
    torch.testing.assert_close(y.float(), expected, rtol=8e-3, atol=8e-3 * expected.abs().max().item())


def test_kmeans_cluster_sums_do_not_overflow_half_precision():
    update = KMeansClusterUpdate(4)
    pixels = 100_000  # a cluster of 10^5 pixels sums to more than float16's largest value (65504)
    assignment = torch.zeros(1, 2, pixels)
    assignment[0, 0] = 1.0
    f = torch.ones(1, 4, pixels)
    with torch.autocast("cpu", dtype=torch.float16):
        pooled = update(assignment.half(), f.half())
    assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, update(assignment, f))


def test_text_alignment_logits_at_temperature_001_are_float32():
    torch.manual_seed(0)
    head = TextAlignmentHead(16, 8, temperature=0.01)
    queries, text = torch.randn(2, 5, 16), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(queries, text)
        probs = head.class_probabilities(queries, text)
        projected = head.proj(queries)
    assert projected.dtype == torch.bfloat16  # the projection is a linear layer and runs reduced
    assert logits.dtype == probs.dtype == torch.float32
    # everything after the projection is float32: the cosines of the bfloat16 projection, / 0.01, exactly
    expected = F.normalize(projected.float(), dim=-1) @ F.normalize(text, dim=-1).t() / 0.01
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(probs, expected.softmax(-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))


def test_dice_denominators_are_float32_and_match_full_precision():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 64, 64, 32, generator=generator) + 4.0  # 131072 voxels, mostly predicted
    target = (torch.rand(logits.shape, generator=generator) > 0.5).float()
    available = torch.ones(1, 2, dtype=torch.bool)
    loss = PartialLabelDiceBCELoss()
    with torch.autocast("cpu", dtype=torch.float16):
        half = loss(logits.half(), target, available)
    full = loss(logits.half().float(), target, available)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert half == full  # the loss upcasts before any sum: sums over 10^5 voxels would overflow float16
