"""DSM's optimiser: SGD for the CNN, AdamW for the query decoder, per-group polynomial decay."""

import torch
from test_networks import build

from nnunetv2_dsm.trainers.optim import DSMOptimizer, PolyLRPerGroup, dsm_parameter_groups, parameter_names


def test_groups_partition_the_parameters_by_part_and_weight_decay() -> None:
    net, _, _ = build(2)
    cnn, decay, no_decay = dsm_parameter_groups(net)
    names = [set(parameter_names(net, g)) for g in (cnn, decay, no_decay)]
    assert sum(map(len, names)) == len(list(net.parameters())) and not (names[0] & names[1]) and not (names[1] & names[2])
    assert all(n.startswith(("encoder.", "decoder.")) and not n.startswith("decoder.pixel_proj.") for n in names[0])
    assert "queries.weight" in names[2] and "decoder.pixel_proj.log_scale" in names[2]
    assert "kmmm_layers.0.ssm.A_log" in names[2] and "kmmm_layers.0.ssm.D" in names[2]
    assert "kmmm_layers.0.self_attn_norm.weight" in names[2] and "kmmm_layers.0.ffn.0.bias" in names[2]
    assert "kmmm_layers.0.ffn.0.weight" in names[1] and "kmmm_layers.0.ssm.in_proj.weight" in names[1]


def test_step_schedule_and_checkpoint_round_trip() -> None:
    net, _, patch = build(2)
    optimizer = DSMOptimizer(net, 1e-2, 3e-5, 3e-4, 0.05)
    scheduler = PolyLRPerGroup(optimizer, 10)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 3e-4, 3e-4]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [3e-5, 0.05, 0.0]
    scheduler.step(5)
    assert [round(g["lr"], 8) for g in optimizer.param_groups] == [round(b * 0.5 ** 0.9, 8) for b in (1e-2, 3e-4, 3e-4)]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer.zero_grad()
    net(torch.randn(2, 1, *patch))[0].square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in net.named_parameters() if p.grad is not None)
    state = optimizer.state_dict()
    other = DSMOptimizer(net, 1e-2, 3e-5, 3e-4, 0.05)
    other.load_state_dict(state)
    assert other.adamw.state_dict()["state"].keys() == optimizer.adamw.state_dict()["state"].keys()
