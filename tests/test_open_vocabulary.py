"""Open-vocabulary prediction answers the prompt asked: per-prompt scoring against the trained classes
and no-object, trained names reproduce trained outputs, no dependence on other prompts or their order,
and a label map where tumours are not overwritten by their organs."""

import pytest
import torch
import torch.nn.functional as F
from test_stage2 import _tiny_network

from nnunetv2_dsm.inference.prompts import is_tumour_prompt, label_map
from nnunetv2_dsm.networks.alignment import class_probabilities, prompt_probabilities

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = _tiny_network().eval()
    trained = F.normalize(torch.randn(4, 8), dim=1)
    net.set_text_embeddings(trained)
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        trained_output = net(x)
    return net, trained, x, trained_output


def _predict(net, x, prompts, trained_index):
    net.set_prompts(prompts, trained_index)
    try:
        with torch.no_grad():
            return net(x)
    finally:
        net.clear_prompts()


def _query_directions(net, x):
    """Unit text vectors matching the first two tumour queries exactly (cosine 1 after projection)."""
    with torch.no_grad():
        _, extras = net(x, return_extras=True)
        head = net.tumour_decoder
        return F.normalize(head.alignment.proj(extras["tumour_queries"][0, :2]), dim=-1)


def test_two_different_single_prompts_give_different_maps(model):
    net, _, x, _ = model
    directions = _query_directions(net, x)
    a = _predict(net, x, directions[0:1], [-1])
    b = _predict(net, x, directions[1:2], [-1])
    assert a.shape == b.shape == (1, 1, 8, 16, 16)
    # each prompt selects its own query, whose mask is its answer
    assert (torch.sigmoid(a) - torch.sigmoid(b)).abs().max() > 0.05
    # and a random text gives yet another answer (in logits: far-off prompts get tiny probabilities)
    c = _predict(net, x, F.normalize(torch.randn(1, 8), dim=1), [-1])
    assert (a - c).abs().max() > 0.5 and (b - c).abs().max() > 0.5


@pytest.mark.parametrize("others", [0, 1, 3])
def test_a_trained_class_name_reproduces_its_trained_output_whatever_else_is_asked(model, others):
    net, trained, x, trained_output = model
    extra = F.normalize(torch.randn(others, 8), dim=1)
    out = _predict(net, x, torch.cat([trained[2:3], extra]), [2] + [-1] * others)
    assert out.shape[1] == 1 + others
    torch.testing.assert_close(out[:, 0], trained_output[:, 2], atol=1e-5, rtol=1e-5)


def test_maps_do_not_depend_on_prompt_order(model):
    net, trained, x, _ = model
    prompts = torch.cat([F.normalize(torch.randn(2, 8), dim=1), trained[1:2]])
    index = [-1, -1, 1]
    order = [2, 0, 1]
    out = _predict(net, x, prompts, index)
    permuted = _predict(net, x, prompts[order], [index[i] for i in order])
    torch.testing.assert_close(permuted, out[:, order], atol=1e-6, rtol=1e-6)


def test_prompts_leave_the_trained_model_unchanged(model):
    net, _, x, trained_output = model
    _predict(net, x, F.normalize(torch.randn(2, 8), dim=1), [-1, -1])
    with torch.no_grad():
        torch.testing.assert_close(net(x), trained_output, atol=1e-3, rtol=1e-4)  # thread-count rounding
    assert "seg_layers.prompt_embeddings" not in "".join(net.state_dict())  # never saved with the weights


def test_prompt_checks(model):
    net = model[0]
    with pytest.raises(ValueError, match="trained_index"):
        net.set_prompts(torch.randn(2, 8), [-1])
    with pytest.raises(ValueError, match="trained_index"):
        net.set_prompts(torch.randn(1, 8), [4])
    with pytest.raises(ValueError, match="text embeddings must be"):
        net.set_prompts(torch.randn(1, 5), [-1])


def test_prompt_probabilities_against_trained_classes_and_no_object():
    class_logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # (B=1, Nq=2, K=2)
    no_object = torch.tensor([[[0.0], [8.0]]])  # the second query matches nothing
    prompt_logits = torch.tensor([[[2.0, 2.0], [1.0, 1.0]]])
    p = prompt_probabilities(class_logits, no_object, prompt_logits, [-1, 0])
    z0 = torch.logsumexp(torch.tensor([2.0, 0.0, 0.0]), 0)
    # a new prompt: sigmoid(l_p - Z); a trained name: that class's own probability
    torch.testing.assert_close(p[0, 0, 0], torch.sigmoid(2.0 - z0))
    torch.testing.assert_close(p[0, 0, 1], class_probabilities(class_logits, no_object)[0, 0, 0])
    assert p[0, 1].max() < 1e-3  # no-object absorbs the unused query
    # without the no-object class the unused query would spread over the classes
    assert class_probabilities(class_logits)[0, 1].sum() == 1.0
    assert class_probabilities(class_logits, no_object)[0, 1].sum() < 1e-3


def test_label_map_keeps_tumours_inside_organs_whatever_the_order():
    liver = torch.tensor([0.9, 0.9, 0.9, 0.2])
    tumour = torch.tensor([0.1, 0.7, 0.6, 0.1])
    spleen = torch.tensor([0.1, 0.1, 0.95, 0.3])
    probs = torch.stack([tumour, liver, spleen])
    flags = [is_tumour_prompt(p) for p in ("liver tumor", "liver", "spleen")]
    assert flags == [True, False, False]
    labels = label_map(probs, flags)
    assert labels.tolist() == [2, 1, 1, 0]
    # organ listed after its tumour, or before it: the tumour stays
    reordered = label_map(probs[[1, 2, 0]], [flags[i] for i in (1, 2, 0)])
    assert reordered.tolist() == [1, 3, 3, 0]
    assert is_tumour_prompt("pancreatic cyst") and is_tumour_prompt("Kidney Tumor")
    assert not is_tumour_prompt("Portal Vein and Splenic Vein") and not is_tumour_prompt("massive liver")
