"""DSM stage-1 network: shapes, gradients, k-means update, nnU-Net construction and inference paths."""

import itertools

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunetv2_dsm.networks.dsm_network import DSMNetwork, LazyExtras
from nnunetv2_dsm.networks.heads import NormalisedMaskProduct
from nnunetv2_dsm.networks.kmmm import KMeansClusterUpdate, KMMMLayer, kmeans_assignment

QUERY_DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def resenc_kwargs(dim: int, n_stages: int, strides: list, conv_bias: bool = True) -> dict:
    """ResEnc arch_kwargs as nnU-Net plans hold them, with classes resolved."""
    conv_op = nn.Conv3d if dim == 3 else nn.Conv2d
    norm_op = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    return dict(
        n_stages=n_stages,
        features_per_stage=[8, 16, 32, 64, 64][:n_stages],
        conv_op=conv_op,
        kernel_sizes=[[3] * dim] * n_stages,
        strides=strides,
        n_blocks_per_stage=[1, 1, 2, 2, 2][:n_stages],
        n_conv_per_stage_decoder=[1] * (n_stages - 1),
        conv_bias=conv_bias,
        norm_op=norm_op,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )


STRIDES_3D = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
PATCH_3D = (16, 32, 32)
STRIDES_2D = [[1, 1], [2, 2], [2, 2], [2, 2]]
PATCH_2D = (64, 64)


def build(dim: int, num_classes: int = 3, conv_bias: bool = True, **dsm) -> tuple[DSMNetwork, dict, tuple]:
    if dim == 3:
        kwargs, patch = resenc_kwargs(3, 5, STRIDES_3D, conv_bias), PATCH_3D
    else:
        kwargs, patch = resenc_kwargs(2, 4, STRIDES_2D, conv_bias), PATCH_2D
    dsm = {"query_dim": QUERY_DIM, "ffn_dim": 32, "num_heads": 2, **dsm}
    torch.manual_seed(0)
    return DSMNetwork(1, num_classes, **kwargs, **dsm), kwargs, patch


def stage_shape(patch: tuple, strides: list, stage: int) -> tuple:
    factor = np.prod(np.array(strides[: stage + 1]), axis=0)
    return tuple(int(p // f) for p, f in zip(patch, factor))


@pytest.mark.parametrize(("dim", "num_kmmm_layers"), [(3, 4), (3, 2), (2, 4), (2, 2)])
def test_output_shapes(dim: int, num_kmmm_layers: int) -> None:
    net, kwargs, patch = build(dim, num_kmmm_layers=num_kmmm_layers)
    n_stages, strides = kwargs["n_stages"], kwargs["strides"]
    levels = min(num_kmmm_layers, n_stages - 1)
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        net.deep_supervision = False
        single = net(x)
        assert single.shape == (2, 3, *patch)

        net.deep_supervision = True
        outputs, extras = net(x, return_extras=True)
    ds_stages = DSMNetwork.deep_supervision_stages(n_stages, num_kmmm_layers)
    assert ds_stages == [0, *range(n_stages - levels, n_stages)]
    assert len(outputs) == len(ds_stages) == levels + 1
    for out, stage in zip(outputs, ds_stages):
        assert out.shape == (2, 3, *stage_shape(patch, strides, stage))
    torch.testing.assert_close(outputs[0], single)

    assert set(extras) == {"queries", "background_query", "class_logits", "responses", "pixel_embedding", "features"}
    assert extras["background_query"] is None
    assert extras["queries"].shape == (2, 3, QUERY_DIM)
    assert extras["class_logits"].shape == (2, 3)
    assert extras["pixel_embedding"].shape == (2, net.encoder.output_channels[0], *patch)
    assert len(extras["responses"]) == len(extras["features"]) == levels
    for k, (m, f) in enumerate(zip(extras["responses"], extras["features"])):
        spatial = stage_shape(patch, strides, n_stages - 1 - k)
        assert f.shape == (2, QUERY_DIM, *spatial)
        assert m is outputs[levels - k]
    # final logits are s cos(W Q_final, E) + b even though E is not materialised on the forward path
    head = net.decoder.pixel_proj
    expected = torch.einsum("bnc,bc...->bn...", head.kernels(extras["queries"]), extras["pixel_embedding"]) + head.bias
    torch.testing.assert_close(outputs[0], expected, rtol=1e-4, atol=1e-4)


def test_lazy_extras_compute_on_first_access_only() -> None:
    calls = []
    extras = LazyExtras({"a": 1}, {"b": lambda: calls.append(1) or 2})
    assert list(extras) == ["a", "b"] and len(extras) == 2 and not calls
    assert extras["b"] == 2 and extras["b"] == 2 and calls == [1]
    assert dict(extras) == {"a": 1, "b": 2}
    with pytest.raises(KeyError):
        extras["c"]


def test_deep_supervision_toggle_follows_nnunet_trainer_attribute() -> None:
    net, _, patch = build(2)
    # nnUNetTrainer.set_deep_supervision_enabled sets network.decoder.deep_supervision
    net.decoder.deep_supervision = True
    assert net.deep_supervision
    with torch.no_grad():
        assert isinstance(net(torch.randn(1, 1, *patch)), list)
    net.deep_supervision = False
    assert not net.decoder.deep_supervision


def test_deep_supervision_stages_for_six_stages_match_paper_strides() -> None:
    stages = DSMNetwork.deep_supervision_stages(6, 4)
    assert stages == [0, 2, 3, 4, 5]
    strides = [1, 2, 2, 2, 2, 2]
    assert [int(np.prod(strides[: s + 1])) for s in stages] == [1, 4, 8, 16, 32]
    assert DSMNetwork.deep_supervision_stages(3, 4) == [0, 1, 2]


@pytest.mark.parametrize(
    "variant", [{}, {"use_ssm": False}, {"use_kmeans": False}, {"ssm_bidirectional": False},
                {"background_query": True}], ids=str
)
def test_every_parameter_gets_gradient(variant: dict) -> None:
    # conv biases directly followed by InstanceNorm have an exactly zero gradient in any network,
    # so the check runs without them.
    net, _, patch = build(3, conv_bias=False, **variant)
    net.deep_supervision = True
    net.train()
    x = torch.randn(2, 1, *patch)
    outputs, extras = net(x, return_extras=True)
    generator = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=generator)).mean() for o in outputs)
    loss = loss + extras["class_logits"].sum()
    loss.backward()
    missing = [
        n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not missing, f"parameters without gradient: {missing}"
    ssm_params = [n for n, _ in net.named_parameters() if ".ssm." in n]
    assert bool(ssm_params) == variant.get("use_ssm", True)


@pytest.mark.parametrize("use_kmeans", [True, False])
def test_mixed_precision_training_step(use_kmeans: bool) -> None:
    # nnU-Net trains under autocast; bfloat16 on CPU exercises the same reduced-precision paths.
    net, _, patch = build(2, use_kmeans=use_kmeans)
    net.deep_supervision = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, extras = net(torch.randn(2, 1, *patch), return_extras=True)
        loss = sum(o.float().mean() for o in outputs) + extras["class_logits"].float().mean()
    loss.backward()
    assert all(torch.isfinite(o).all() for o in outputs)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.kmmm_layers[0].ssm.A_log.grad.any()


def test_kmeans_update_equals_explicit_per_cluster_sum() -> None:
    torch.manual_seed(0)
    b, n, c, length = 2, 5, 8, 40
    update = KMeansClusterUpdate(c)
    f = torch.randn(b, c, length)
    logits = torch.randn(b, n, length)
    logits[:, 4] = -1e3  # query 4 owns no pixel: its update is the empty sum
    assignment = kmeans_assignment(logits)
    assert torch.equal(assignment.sum(1), torch.ones(b, length))
    result = update(assignment, f)

    owner = logits.argmax(1)
    expected = torch.zeros(b, n, c)
    for bi in range(b):
        for ni in range(n):
            for li in range(length):
                if owner[bi, li] == ni:
                    expected[bi, ni] += update.value(f[bi, :, li])
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(result[:, 4], torch.zeros(b, c))


def test_kmeans_assignment_blocks_gradient_but_values_get_it() -> None:
    torch.manual_seed(0)
    layer = KMMMLayer(3, QUERY_DIM, num_heads=2, ffn_dim=32, use_ssm=False)
    q = torch.randn(1, 3, QUERY_DIM)
    f = torch.randn(1, QUERY_DIM, 4, 4, 4, requires_grad=True)
    new_q, m = layer(q, f)
    assert m.shape == (1, 3, 4, 4, 4)
    new_q.sum().backward()
    assert layer.query_proj.weight.grad is None  # only reached through M_l (deep supervision)
    assert layer.update.value.weight.grad.any()
    assert f.grad.any()


def test_masked_cross_attention_empty_mask_falls_back_to_full_attention() -> None:
    torch.manual_seed(0)
    layer = KMMMLayer(2, QUERY_DIM, num_heads=2, ffn_dim=32, use_kmeans=False, use_ssm=False)
    q = torch.randn(1, 2, QUERY_DIM)
    f = torch.randn(1, QUERY_DIM, 6)
    logits = torch.full((1, 2, 6), -1.0)
    logits[0, 0, :2] = 1.0
    pixels = f.transpose(1, 2)
    out = layer.update(q, pixels, logits > 0)
    assert torch.isfinite(out).all()
    restricted = layer.update(q[:, :1], pixels[:, :2])
    full = layer.update(q[:, 1:], pixels)
    torch.testing.assert_close(out[:, :1], restricted)
    torch.testing.assert_close(out[:, 1:], full)


def test_mask_product_is_a_scaled_soft_cosine_bounded_by_its_scale() -> None:
    torch.manual_seed(0)
    head = NormalisedMaskProduct(6, QUERY_DIM)
    q = 100 * torch.randn(2, 3, QUERY_DIM)
    f = 1000 * torch.randn(2, 6, 5, 4, 3)
    k = head.kernel(q)
    soft = f / (f.square().sum(1, keepdim=True) + 6).sqrt()
    cosine = torch.einsum("bnc,bxyzc->bnxyz", k / k.norm(dim=-1, keepdim=True), soft.permute(0, 2, 3, 4, 1))
    reference = head.log_scale.exp() * cosine + head.bias
    torch.testing.assert_close(head(q, f), reference, rtol=1e-5, atol=1e-5)
    explicit = torch.einsum("bnc,bc...->bn...", head.kernels(q), head.embed(f)) + head.bias
    torch.testing.assert_close(head(q, f), explicit, rtol=1e-5, atol=1e-5)
    # Large inputs give bounded logits, O(1) at initialisation; weak pixel features give logits near the bias.
    assert head(q, f).abs().max() <= head.log_scale.exp() + 1e-4
    assert (head(q, 1e-6 * f) - head.bias).abs().max() < 1e-2
    assert float(head.log_scale.exp()) == pytest.approx(4.0)
    assert head.log_scale._no_weight_decay and head.bias._no_weight_decay


def test_eval_output_is_deterministic() -> None:
    net, _, patch = build(3)
    net.eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def plans_configuration(dim: int, patch: tuple, n_stages: int, strides: list) -> dict:
    conv = "Conv3d" if dim == 3 else "Conv2d"
    norm = "InstanceNorm3d" if dim == 3 else "InstanceNorm2d"
    arch = resenc_kwargs(dim, n_stages, strides)
    arch.update(
        conv_op=f"torch.nn.modules.conv.{conv}",
        norm_op=f"torch.nn.modules.instancenorm.{norm}",
        nonlin="torch.nn.LeakyReLU",
        num_kmmm_layers=4,
        query_dim=QUERY_DIM,
        ffn_dim=32,
        num_heads=2,
    )
    return {
        "patch_size": list(patch),
        "architecture": {
            "network_class_name": "nnunetv2_dsm.networks.dsm_network.DSMNetwork",
            "arch_kwargs": arch,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }


def test_get_network_from_plans_builds_and_initialises() -> None:
    cm = ConfigurationManager(plans_configuration(3, PATCH_3D, 5, STRIDES_3D))
    torch.manual_seed(0)
    net = get_network_from_plans(
        cm.network_arch_class_name,
        cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import,
        1,
        2,
        deep_supervision=True,
    )
    assert isinstance(net, DSMNetwork)
    assert net.deep_supervision
    assert isinstance(net.encoder.stages[0].blocks[0].conv1.conv, nn.Conv3d)
    # ResEnc initialisation: He-initialised convs with zero bias, last norm of each residual block zeroed
    assert not net.encoder.stages[1].blocks[0].conv2.norm.weight.any()
    assert not net.encoder.stem.convs[0].conv.bias.any()
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *PATCH_3D))
    assert len(outputs) == 5 and outputs[0].shape == (1, 2, *PATCH_3D)


def test_backbone_state_dict_matches_resenc() -> None:
    net, kwargs, _ = build(2)
    resenc = ResidualEncoderUNet(1, num_classes=3, **kwargs)
    resenc_keys = {
        k for k in resenc.state_dict() if ".seg_layers." not in k and not k.startswith("decoder.encoder.")
    }
    dsm_keys = {
        k for k in net.state_dict() if k.startswith(("encoder.", "decoder.stages.", "decoder.transpconvs."))
    }
    assert dsm_keys == resenc_keys
    missing, _ = net.load_state_dict(resenc.state_dict(), strict=False)
    assert all(not k.startswith(("encoder.", "decoder.stages.", "decoder.transpconvs.")) for k in missing)


def test_nnunet_predictor_mirroring_and_sliding_window() -> None:
    net, _, patch = build(3, num_classes=2)
    net.eval()
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.network = net
    predictor.allowed_mirroring_axes = (0, 1, 2)
    predictor.configuration_manager = ConfigurationManager(plans_configuration(3, patch, 5, STRIDES_3D))
    predictor.label_manager = LabelManager(
        {"background": 0, "liver": [1, 2], "liver_tumor": 2}, regions_class_order=[1, 2]
    )
    assert predictor.label_manager.num_segmentation_heads == 2

    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        mirrored = predictor._internal_maybe_mirror_and_predict(x)
        expected = net(x)
        combos = [c for i in range(3) for c in itertools.combinations([2, 3, 4], i + 1)]
        for axes in combos:
            expected += torch.flip(net(torch.flip(x, axes)), axes)
        expected /= len(combos) + 1
    assert mirrored.shape == (1, 2, *patch)
    torch.testing.assert_close(mirrored, expected)

    image = torch.randn(1, patch[0], patch[1] + 8, patch[2])
    logits = predictor.predict_sliding_window_return_logits(image)
    assert logits.shape == (2, *image.shape[1:])
    assert torch.isfinite(logits).all()


def test_invalid_configuration_names_the_fix() -> None:
    kwargs = resenc_kwargs(2, 4, STRIDES_2D)
    with pytest.raises(ValueError, match="num_kmmm_layers"):
        DSMNetwork(1, 3, **kwargs, num_kmmm_layers=0)
    with pytest.raises(ValueError, match="num_heads"):
        DSMNetwork(1, 3, **kwargs, query_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="num_classes"):
        DSMNetwork(1, 0, **kwargs)


def test_ssm_trains_without_deep_supervision() -> None:
    """Only the final masks carry a loss then; the straight-through k-means assignment reaches the SSM."""
    net, _, patch = build(2)
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        net.deep_supervision = False
        reference = net(x)
    out = net(x)
    torch.testing.assert_close(out, reference)  # the straight-through estimator leaves the values unchanged
    out.square().mean().backward()
    ssm = {n: p.grad for n, p in net.named_parameters() if ".ssm." in n}
    # The last layer's SSM only shapes masks that no later layer reads: all others must learn.
    reached = [n for n, g in ssm.items() if g is not None and g.abs().sum() > 0]
    earlier = [n for n in ssm if not n.startswith(f"kmmm_layers.{len(net.kmmm_layers) - 1}.")]
    assert earlier and set(earlier) <= set(reached)


def test_kmeans_void_leaves_unclaimed_pixels_out_of_every_cluster() -> None:
    logits = torch.tensor([[[2.0, -1.0, -3.0], [1.0, 0.5, -2.0]]])  # (B=1, N=2, L=3): pixel 2 unclaimed
    assert kmeans_assignment(logits).sum(1).tolist() == [[1.0, 1.0, 1.0]]
    void = kmeans_assignment(logits, void=True)
    assert void.tolist() == [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]
    logits.requires_grad_()
    straight = kmeans_assignment(logits, straight_through=True, void=True)
    assert torch.equal(straight.detach(), void)
    straight[:, 0].sum().backward()
    assert logits.grad[..., 2].abs().sum() == 0 and logits.grad[..., :2].abs().sum() > 0


def test_background_query_makes_every_mask_relative_to_it() -> None:
    """Query 0 is background: class logits are m_c - m_bg at every output, and its k-means cluster
    takes the pixels it wins, so background is summed into no organ's query."""
    net, _, patch = build(3, background_query=True)
    assert net.queries.weight.shape[0] == net.num_classes + 1
    net.deep_supervision = True
    net.eval()
    x = torch.randn(1, 1, *patch)
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[1])) for layer in net.kmmm_layers]
    with torch.no_grad():
        outputs, extras = net(x, return_extras=True)
    for h in hooks:
        h.remove()
    assert all(o.shape[1] == net.num_classes for o in outputs)
    for raw, relative in zip(captured, extras["responses"]):
        assert raw.shape[1] == net.num_classes + 1
        torch.testing.assert_close(relative, raw[:, 1:] - raw[:, :1])
    assert extras["queries"].shape[1] == net.num_classes and extras["background_query"].shape[1] == 1
    assert extras["class_logits"].shape == (1, net.num_classes)


def test_update_dropout_skips_whole_updates_in_training_only() -> None:
    """Stochastic depth on the k-means update: per sample, the update is dropped (queries unchanged by
    the image) or kept scaled by 1/(1-p); in evaluation it is always applied as is."""
    from nnunetv2_dsm.networks.kmmm import KMMMLayer

    torch.manual_seed(0)
    layer = KMMMLayer(3, 16, num_heads=2, ffn_dim=32, use_ssm=False, update_dropout=0.5)
    q = torch.randn(64, 3, 16)
    f = torch.randn(64, 16, 6, 6)
    seen = []
    layer.self_attn.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    layer.train()
    layer(q, f)
    changed = (seen[-1] - q).abs().amax(dim=(1, 2)) > 0
    assert 0 < int(changed.sum()) < 64, "some samples keep their queries, others are updated"
    layer.eval()
    layer(q, f)
    first = seen[-1]
    layer(q, f)
    assert torch.equal(first, seen[-1]) and bool(((first - q).abs().amax(dim=(1, 2)) > 0).all())
    with pytest.raises(ValueError, match="update_dropout"):
        KMMMLayer(3, 16, num_heads=2, update_dropout=1.0)


def test_query_channels_give_queries_to_those_classes_only() -> None:
    """Organ-only stage 1: 2 of 4 classes have a query; every output keeps 4 channels, the others hold
    the constant NO_QUERY_LOGIT and take no gradient, and the queried channels train."""
    from nnunetv2_dsm.networks.dsm_network import NO_QUERY_LOGIT

    net, _, patch = build(2, num_classes=4, query_channels=[0, 2])
    assert net.queries.weight.shape[0] == 2 and net.num_stage1_queries == 2
    assert net.queried.tolist() == [True, False, True, False]
    net.deep_supervision = True
    x = torch.randn(2, 1, *patch)
    outputs, extras = net(x, return_extras=True)
    assert all(o.shape[:2] == (2, 4) for o in outputs)
    for o in outputs:
        assert bool((o[:, [1, 3]] == NO_QUERY_LOGIT).all()) and not bool((o[:, [0, 2]] == NO_QUERY_LOGIT).any())
    assert extras["class_logits"].shape == (2, 4) and bool((extras["class_logits"][:, [1, 3]] == NO_QUERY_LOGIT).all())
    sum(o[:, [0, 2]].mean() for o in outputs).backward()
    assert net.queries.weight.grad is not None and bool(net.queries.weight.grad.abs().sum() > 0)

    all_classes, _, _ = build(2, num_classes=4, query_channels=[0, 1, 2, 3])
    assert all_classes.query_channels is None and all_classes.queried.all(), "every class queried = the default"
    with pytest.raises(ValueError, match="query_channels"):
        build(2, num_classes=4, query_channels=[0, 4])
