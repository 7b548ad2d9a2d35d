"""Stage-2 building blocks: anomaly prompt, masked cross-attention, guided feature diffusion, DQR layer,
text alignment and semantic inference (2d and 3d)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_dsm.networks.alignment import (
    TextAlignmentHead,
    class_probabilities,
    semantic_logits,
    semantic_masks,
)
from nnunetv2_dsm.networks.amvp import AnomalyMaskPrompt, anomaly_prompt, anomaly_score, minmax_per_case
from nnunetv2_dsm.networks.dqr import DQRLayer, DQROutput, GuidedFeatureDiffusion, resize_to
from nnunetv2_dsm.networks.masked_attention import MaskedCrossAttention

SPATIAL = {2: (6, 7), 3: (4, 5, 3)}


@pytest.fixture(autouse=True)
def _seeded(one_thread):
    torch.manual_seed(0)


def assert_every_parameter_has_gradient(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# ---------------------------------------------------------------- AMVP


def test_anomaly_score_is_normalised_per_case():
    responses = torch.randn(2, 3, 5, 6)
    score = anomaly_score(responses)
    assert score.shape == (2, 5, 6)
    for case in range(2):
        assert score[case].min() == 0.0 and score[case].max() == 1.0
    raw = -responses[0].amax(dim=0)
    torch.testing.assert_close(score[0], (raw - raw.min()) / (raw.max() - raw.min()))

    scaled = responses.clone()
    scaled[1] = scaled[1] * 100.0 + 5.0
    rescored = anomaly_score(scaled)
    assert torch.equal(rescored[0], score[0]), "scaling case 1 changed case 0's score"
    torch.testing.assert_close(rescored[1], score[1])
    for case in range(2):
        assert rescored[case].min() == 0.0 and rescored[case].max() == 1.0


def test_anomaly_score_of_constant_case_is_zero_without_nan():
    responses = torch.randn(2, 2, 4, 4, 3)
    responses[1] = 3.7
    responses.requires_grad_(True)
    score = anomaly_score(responses)
    assert torch.equal(score[1], torch.zeros_like(score[1]))
    assert score[0].max() == 1.0
    score.sum().backward()
    assert torch.isfinite(responses.grad).all()
    assert torch.equal(minmax_per_case(torch.zeros(1, 3, 3)), torch.zeros(1, 3, 3))


def test_anomaly_prompt_marks_the_low_response_region():
    responses = torch.full((1, 2, 8, 8), 5.0) + 0.1 * torch.randn(1, 2, 8, 8)
    responses[:, :, 2:4, 5:7] = -5.0  # no organ query claims this block
    score = anomaly_score(responses)
    prompt = anomaly_prompt(score)
    assert prompt.dtype == torch.bool
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[:, 2:4, 5:7] = True
    assert torch.equal(prompt, expected)
    assert torch.equal(anomaly_prompt(score, threshold=0.99), score > 0.99)


@pytest.mark.parametrize("dim", [2, 3])
def test_anomaly_mask_prompt_resizes_score_before_thresholding(dim):
    low = (4,) * dim
    responses = torch.randn(2, 3, *low)
    module = AnomalyMaskPrompt()
    score, prompt = module(responses)
    assert torch.equal(score, anomaly_score(responses))
    assert torch.equal(prompt, score > 0.5)

    target = (8,) * dim
    score, prompt = module(responses, size=target)
    assert score.shape == prompt.shape == (2, *target)
    mode = "bilinear" if dim == 2 else "trilinear"
    raw = F.interpolate(-responses.amax(1, keepdim=True), size=target, mode=mode, align_corners=False)[:, 0]
    torch.testing.assert_close(score, minmax_per_case(raw))
    for case in range(2):
        assert score[case].min() == 0.0 and score[case].max() == 1.0
    assert torch.equal(prompt, score > 0.5)


def test_anomaly_mask_prompt_case_range_pools_the_tiles():
    module = AnomalyMaskPrompt()
    tiles = [torch.randn(1, 3, 6, 6), torch.randn(1, 3, 6, 6) * 4.0]
    module.record_case_range()
    raws = [-t.amax(dim=1) for t in tiles]
    for t in tiles:
        module(t, level=0)
    module.use_case_range()
    lo, hi = min(float(r.min()) for r in raws), max(float(r.max()) for r in raws)
    for t, raw in zip(tiles, raws):
        score, prompt = module(t, level=0)
        torch.testing.assert_close(score, (raw - lo) / (hi - lo))
        assert torch.equal(prompt, score > 0.5)
    # the quieter tile no longer spans [0, 1] on its own
    assert float(module(tiles[0], level=0)[0].max()) < 1.0
    # levels without a recorded range, and everything after clear_case_range, are normalised per input
    torch.testing.assert_close(module(tiles[0], level=1)[0], minmax_per_case(raws[0]))
    module.clear_case_range()
    torch.testing.assert_close(module(tiles[0], level=0)[0], minmax_per_case(raws[0]))
    with pytest.raises(RuntimeError, match="record_case_range"):
        module.use_case_range()


def test_anomaly_inputs_are_checked():
    with pytest.raises(ValueError, match="N_organ"):
        anomaly_score(torch.randn(2, 0, 4, 4))
    with pytest.raises(ValueError, match="spatial dims"):
        AnomalyMaskPrompt()(torch.randn(1, 2, 4, 4), size=(8, 8, 8))
    with pytest.raises(ValueError, match="threshold"):
        AnomalyMaskPrompt(threshold=1.5)


# ---------------------------------------------------------------- masked cross-attention


def reference_attention(module: MaskedCrossAttention, q, kv, allowed) -> torch.Tensor:
    """nn.MultiheadAttention loaded with the same weights, blocked = ~allowed per head."""
    dim = q.shape[-1]
    mha = nn.MultiheadAttention(dim, module.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias]))
        mha.out_proj.weight.copy_(module.out_proj.weight)
        mha.out_proj.bias.copy_(module.out_proj.bias)
    out, weights = mha(q, kv, kv, attn_mask=(~allowed).repeat_interleave(module.num_heads, 0))
    return module.norm(q + out), weights


def test_masked_attention_matches_multihead_attention_and_ignores_masked_positions():
    module = MaskedCrossAttention(8, num_heads=2).eval()
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 10, 8)
    allowed = torch.rand(2, 3, 10) > 0.5
    allowed[:, :, 0] = True
    expected, weights = reference_attention(module, q, kv, allowed)
    out = module(q, kv, allowed)
    torch.testing.assert_close(out, expected)
    assert torch.all(weights[~allowed] == 0)

    prompt = torch.zeros(2, 10, dtype=torch.bool)
    prompt[0, 2:5] = True
    prompt[1, 7:] = True
    out = module(q, kv, prompt)
    perturbed = kv.clone()
    perturbed[~prompt] = 1e3 * torch.randn(int((~prompt).sum()), 8)
    torch.testing.assert_close(module(q, perturbed, prompt), out, rtol=0, atol=1e-6)
    assert not torch.allclose(module(q, perturbed), module(q, kv))


def test_masked_attention_with_empty_mask_attends_everywhere():
    module = MaskedCrossAttention(8, num_heads=4).eval()
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    allowed = torch.zeros(2, 3, 6, dtype=torch.bool)
    allowed[0, 1, 2] = True  # one query of one case has an allowed position, every other row is empty
    out = module(q, kv, allowed)
    assert torch.isfinite(out).all()
    full = module(q, kv)
    torch.testing.assert_close(out[1], full[1])
    torch.testing.assert_close(out[0, [0, 2]], full[0, [0, 2]])
    assert not torch.allclose(out[0, 1], full[0, 1])
    torch.testing.assert_close(module(q, kv, torch.zeros(2, 6, dtype=torch.bool)), full)


def test_masked_attention_gradients_and_input_checks():
    module = MaskedCrossAttention(8, num_heads=2, dropout=0.1).train()
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    pos = torch.randn(2, 5, 8)
    allowed = torch.rand(2, 3, 5) > 0.3
    module(q, kv, allowed, query_pos=torch.randn(2, 3, 8), kv_pos=pos).pow(2).sum().backward()
    assert_every_parameter_has_gradient(module)
    with pytest.raises(ValueError, match="bool"):
        module(q, kv, allowed.float())
    with pytest.raises(ValueError, match=r"\(B, Nq, L\)"):
        module(q, kv, torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        MaskedCrossAttention(10, num_heads=3)


# ---------------------------------------------------------------- guided feature diffusion


@pytest.mark.parametrize("dim", [2, 3])
def test_diffusion_leaves_a_constant_feature_unchanged(dim):
    module = GuidedFeatureDiffusion(4, 6, steps=3)
    f = torch.randn(2, 4, *([1] * dim)).expand(2, 4, *SPATIAL[dim]).contiguous()
    guide = torch.randn(2, 6, *SPATIAL[dim])
    weights = module.neighbourhood_weights(guide)
    torch.testing.assert_close(module.diffusion_step(f, weights), f)
    torch.testing.assert_close(module.diffuse(f, guide), f)
    torch.testing.assert_close(module(f, guide), f)


@pytest.mark.parametrize("dim", [2, 3])
def test_diffusion_weights_are_normalised_and_exclude_the_outside(dim):
    module = GuidedFeatureDiffusion(4, 6, kernel_size=3)
    weights = module.neighbourhood_weights(torch.randn(2, 6, *SPATIAL[dim]))
    assert weights.shape == (2, 3**dim, *SPATIAL[dim])
    torch.testing.assert_close(weights.sum(1), torch.ones(2, *SPATIAL[dim]))
    assert (weights >= 0).all()
    corner = weights[(slice(None), slice(None), *([0] * dim))]
    inside = torch.tensor([all(o >= 1 for o in off) for off in module._offsets(dim)])
    assert torch.all(corner[:, ~inside] == 0) and torch.all(corner[:, inside] > 0)


def test_diffusion_is_stable_under_many_steps():
    module = GuidedFeatureDiffusion(3, 3, steps=20, step_size=0.95)
    f = torch.randn(1, 3, 8, 8)
    out = module.diffuse(f, torch.randn(1, 3, 8, 8))
    assert (out.amax(dim=(2, 3)) <= f.amax(dim=(2, 3)) + 1e-5).all()
    assert (out.amin(dim=(2, 3)) >= f.amin(dim=(2, 3)) - 1e-5).all()


def test_diffusion_across_a_guidance_edge_is_smaller_than_along_it():
    module = GuidedFeatureDiffusion(1, 4, steps=4, embed_dim=8)
    with torch.no_grad():
        module.guide_proj.bias.zero_()
    direction = torch.randn(4)
    guide = torch.empty(1, 4, 9, 10)
    guide[..., :5] = 3.0 * direction.view(1, 4, 1, 1)
    guide[..., 5:] = -3.0 * direction.view(1, 4, 1, 1)  # sharp vertical edge between columns 4 and 5
    f = torch.zeros(1, 1, 9, 10)
    f[0, 0, 4, 4] = 1.0  # spike right next to the edge
    with torch.no_grad():
        out = module.diffuse(f, guide)[0, 0]
        flat_guide = guide[..., :1].expand_as(guide)
        isotropic = module.diffuse(f, flat_guide)[0, 0]
    along = out[:, :5].sum() - out[4, 4]  # mass spread on the spike's side of the edge
    across = out[:, 5:].sum()
    assert along > 0.1
    assert across < 1e-3 * along
    assert isotropic[:, 5:].sum() > 0.1, "without an edge the spike must spread to the right half"


@pytest.mark.parametrize("dim", [2, 3])
def test_diffusion_upsamples_the_guide_and_trains_every_parameter(dim):
    module = GuidedFeatureDiffusion(4, 6, steps=2)
    f = torch.randn(2, 4, *SPATIAL[dim], requires_grad=True)
    low = tuple(max(1, s // 2) for s in SPATIAL[dim])
    guide = torch.randn(2, 6, *low, requires_grad=True)
    out = module(f, guide)
    assert out.shape == f.shape
    out.pow(2).sum().backward()
    assert_every_parameter_has_gradient(module)
    assert guide.grad is not None and guide.grad.abs().sum() > 0


def test_diffusion_input_checks():
    with pytest.raises(ValueError, match="guide_channels == channels"):
        GuidedFeatureDiffusion(4, 6)(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="guide must be"):
        GuidedFeatureDiffusion(4, 6)(torch.randn(1, 4, 5, 5), torch.randn(1, 5, 5, 5))
    with pytest.raises(ValueError, match="odd"):
        GuidedFeatureDiffusion(4, 6, kernel_size=4)
    with pytest.raises(ValueError, match="step_size"):
        GuidedFeatureDiffusion(4, 6, step_size=1.0)
    self_guided = GuidedFeatureDiffusion(4, 4)(torch.randn(1, 4, 5, 5))
    assert self_guided.shape == (1, 4, 5, 5)


# ---------------------------------------------------------------- DQR layer


@pytest.mark.parametrize("dim", [2, 3])
def test_dqr_layer_shapes_and_gradients(dim):
    layer = DQRLayer(16, guide_dim=8, num_heads=4, ffn_dim=32, diffusion_steps=2).train()
    spatial = SPATIAL[dim]
    tumour, organ = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    feature = torch.randn(2, 16, *spatial)
    guide = torch.randn(2, 8, *(max(1, s // 2) for s in spatial))
    score, prompt = AnomalyMaskPrompt()(torch.randn(2, 5, *(max(1, s // 2) for s in spatial)), size=spatial)
    out = layer(tumour, organ, feature, guide, prompt)
    assert isinstance(out, DQROutput)
    assert out.tumour_queries.shape == (2, 3, 16)
    assert out.organ_queries.shape == (2, 5, 16)
    assert out.feature.shape == feature.shape
    (out.tumour_queries.pow(2).sum() + out.organ_queries.pow(2).sum()).backward()
    assert_every_parameter_has_gradient(layer)

    with pytest.raises(ValueError, match="AnomalyMaskPrompt"):
        layer(tumour, organ, feature, guide, prompt[:, :2])


def test_dqr_layer_tumour_queries_only_read_the_prompted_region():
    layer = DQRLayer(8, num_heads=2, ffn_dim=16, diffusion_steps=1).eval()
    tumour, organ = torch.randn(1, 2, 8), torch.randn(1, 3, 8)
    feature = torch.randn(1, 8, 6, 6)
    prompt = torch.zeros(1, 6, 6, dtype=torch.bool)
    prompt[:, 1:4, 2:5] = True
    out = layer(tumour, organ, feature, None, prompt)

    fused = layer.diffusion(feature, None)
    prompted_pixels = fused.flatten(2).transpose(1, 2)[:, prompt.flatten()]
    q = torch.cat([organ, layer.cross_attn(tumour, prompted_pixels)], dim=1)
    q = layer.self_attn_norm(q + layer.self_attn(q, q, q)[0])
    q = layer.ffn_norm(q + layer.ffn(q))
    torch.testing.assert_close(out.feature, fused)
    torch.testing.assert_close(out.organ_queries, q[:, :3])
    torch.testing.assert_close(out.tumour_queries, q[:, 3:])
    assert not torch.allclose(layer(tumour, organ, feature, None, None).tumour_queries, out.tumour_queries)


# ---------------------------------------------------------------- alignment


def orthonormal_rows(n: int, dim: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(dim, n)).Q.t()


def identity_head(dim: int, temperature: float = 0.01) -> TextAlignmentHead:
    head = TextAlignmentHead(dim, dim, temperature=temperature)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(dim))
        head.proj.bias.zero_()
    return head


def test_alignment_logits_are_scaled_cosines_and_temperature_sharpens():
    text = orthonormal_rows(4, 16)
    queries = 3.0 * text.unsqueeze(0)  # query q aligned with class q, norms must not matter
    sharp = identity_head(16, 0.01)
    logits = sharp(queries, 5.0 * text)
    assert logits.shape == (1, 4, 4)
    torch.testing.assert_close(logits * 0.01, torch.eye(4).unsqueeze(0), atol=1e-5, rtol=0)
    p_sharp = sharp.class_probabilities(queries, text)
    p_soft = class_probabilities(identity_head(16, 1.0)(queries, text))
    torch.testing.assert_close(p_sharp.sum(-1), torch.ones(1, 4))
    assert p_sharp.diagonal(dim1=1, dim2=2).min() > 0.999
    assert p_soft.diagonal(dim1=1, dim2=2).max() < 0.5


@pytest.mark.parametrize("dim", [2, 3])
def test_seen_and_unseen_prompts_give_different_semantic_maps(dim):
    directions = orthonormal_rows(3, 16)
    seen, unseen = directions[:2], directions[2:]
    queries = directions.unsqueeze(0).expand(2, -1, -1)  # third query learned the unseen direction
    mask_logits = 4.0 * torch.randn(2, 3, *SPATIAL[dim])
    head = identity_head(16)
    maps = semantic_masks(mask_logits, head.class_probabilities(queries, torch.cat([seen, unseen])))
    assert maps.shape == (2, 3, *SPATIAL[dim])
    torch.testing.assert_close(maps, torch.sigmoid(mask_logits), atol=1e-4, rtol=0)
    assert (maps[:, 2] - maps[:, 0]).abs().max() > 0.5

    # without the unseen class the third query matches no class; the no-object embedding takes it, so it
    # adds nothing to the seen classes' maps (without no-object it would split evenly over them)
    no_object = head(queries, unseen)
    seen_only = semantic_masks(mask_logits, class_probabilities(head(queries, seen), no_object))
    assert seen_only.shape == (2, 2, *SPATIAL[dim])
    torch.testing.assert_close(seen_only, maps[:, :2], atol=1e-4, rtol=0)


def test_semantic_masks_match_the_maskformer_sum_and_logits_clip_it_to_one():
    mask_logits = torch.randn(2, 4, 5, 6)
    probs = torch.softmax(torch.randn(2, 4, 3), dim=-1)
    expected = torch.zeros(2, 3, 5, 6)
    for c in range(3):
        for q in range(4):
            expected[:, c] += probs[:, q, c, None, None] * torch.sigmoid(mask_logits[:, q])
    torch.testing.assert_close(semantic_masks(mask_logits, probs), expected)

    one_claim = torch.eye(4, 3).unsqueeze(0).expand(2, -1, -1)  # at most one query per class
    torch.testing.assert_close(
        torch.sigmoid(semantic_logits(mask_logits, one_claim)), semantic_masks(mask_logits, one_claim)
    )
    two_claims = torch.zeros(2, 4, 3)
    two_claims[:, :2, 0] = 1.0
    two_claims[:, 2:, 1] = 1.0
    saturated = torch.full((2, 4, 5, 6), 20.0)
    assert semantic_masks(saturated, two_claims)[:, 0].min() > 1.9
    bounded = torch.sigmoid(semantic_logits(saturated, two_claims))
    assert bounded.max() <= 1.0 and torch.isfinite(semantic_logits(saturated, two_claims)).all()
    # two queries claiming one class add up (MaskFormer's sum), clipped to 1
    torch.testing.assert_close(
        torch.sigmoid(semantic_logits(mask_logits, two_claims))[:, 0],
        torch.sigmoid(mask_logits[:, :2]).sum(1).clamp(max=1 - 1e-6),
    )


def test_alignment_head_trains_with_bce_on_semantic_logits():
    head = TextAlignmentHead(8, 12)
    queries = torch.randn(2, 4, 8, requires_grad=True)
    mask_logits = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    text = torch.randn(5, 12)
    logits = semantic_logits(mask_logits, head.class_probabilities(queries, text))
    assert logits.shape == (2, 5, 3, 3, 3)
    target = (torch.rand_like(logits) > 0.5).float()
    F.binary_cross_entropy_with_logits(logits, target).backward()
    assert_every_parameter_has_gradient(head)
    assert queries.grad.abs().sum() > 0 and mask_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text embeddings"):
        head(queries, torch.randn(5, 11))
    with pytest.raises(ValueError, match="same B and Nq"):
        semantic_masks(mask_logits, torch.rand(2, 3, 5))
    assert math.isclose(head.temperature, 0.01)


@pytest.mark.parametrize("dim", [2, 3])
def test_guide_projection_at_coarse_resolution_equals_projecting_the_upsampled_guide(dim):
    torch.manual_seed(0)
    module = GuidedFeatureDiffusion(4, 6)
    f = torch.randn(2, 4, *[8] * dim)
    guide = torch.randn(2, 6, *[3] * dim)
    upsampled = resize_to(guide, tuple(f.shape[2:]))
    expected = torch.nn.functional.normalize(module.guide_proj(upsampled.movedim(1, -1)), dim=-1)
    torch.testing.assert_close(module.similarity_embedding(f, guide), expected, rtol=1e-5, atol=1e-6)
