"""Muon for conv filters (airbench94_muon's split) and the whitening bias stopped after N epochs."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_tiny
from imgflow.errors import UserError
from imgflow.training.config import TrainConfig, resolve_config
from imgflow.training.muon import MUON_NS_STEPS, MuonAndSGD, matrix_view
from imgflow.training.optim import apply_whitening_bias, build_optimizer, set_lr


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_filter_bank_is_a_matrix_view_of_the_same_storage(layout):
    filters = torch.randn(4, 3, 3, 3).contiguous(memory_format=layout)
    matrix = matrix_view(filters)
    assert matrix.shape == (4, 27) and matrix.data_ptr() == filters.data_ptr()
    matrix[1].zero_()  # a row of the view is one output filter
    assert torch.all(filters[1] == 0) and torch.all(filters[0] != 0)


def _conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, bias=False), torch.nn.BatchNorm2d(8),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 3))
    return net.to(memory_format=torch.channels_last)


def _one_step(net, optimizer) -> torch.Tensor:
    x = torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    optimizer.zero_grad()
    net(x).square().mean().backward()
    grad = net[0].weight.grad.clone()
    optimizer.step()
    return grad


def test_muon_steps_the_filters_by_an_orthogonalised_descent_direction_and_sgd_the_rest():
    net = _conv_net()
    filters, head = net[0].weight, net[3].weight
    before, head_before = filters.detach().clone(), head.detach().clone()
    optimizer = build_optimizer(net, TrainConfig("x", "fast-small", optimizer="muon", lr=0.1, muon_lr=0.05,
                                                 momentum=0.0))
    assert isinstance(optimizer, MuonAndSGD)
    set_lr(optimizer, 0.1)
    grad = _one_step(net, optimizer)
    normalised = before * math.sqrt(8) / before.norm()
    update = matrix_view((normalised - filters.detach()) / 0.05)  # the step Muon took, per unit lr
    singular = torch.linalg.svdvals(update.float())
    # 3 Newton-Schulz steps of the quintic: every direction of the gradient moved by an O(1) amount,
    # none by much more (a plain gradient step would be dominated by its top direction).
    assert singular.min() > 0.2 and singular.max() < 1.8, singular
    assert float((update * matrix_view(grad)).sum()) > 0  # downhill
    assert torch.allclose(head.detach(), head_before - 0.1 * net[3].weight.grad, atol=1e-6)  # plain SGD


def test_muon_keeps_each_filter_bank_at_a_fixed_norm_before_its_step():
    net = _conv_net()
    with torch.no_grad():
        net[0].weight.mul_(7.0)  # BatchNorm follows: the scale carries nothing
    optimizer = build_optimizer(net, TrainConfig("x", "fast-small", optimizer="muon", muon_lr=1e-6))
    set_lr(optimizer, 1e-6)
    _one_step(net, optimizer)
    assert float(net[0].weight.detach().norm()) == pytest.approx(math.sqrt(8), rel=1e-3)
    assert MUON_NS_STEPS == 3


def test_muon_state_round_trips_through_a_checkpoint():
    net = _conv_net()
    config = TrainConfig("x", "fast-small", optimizer="muon", lr=0.1)
    optimizer = build_optimizer(net, config)
    set_lr(optimizer, 0.1)
    _one_step(net, optimizer)
    state = optimizer.state_dict()
    other = build_optimizer(_conv_net(), config)
    other.load_state_dict(state)
    bufs = [s["momentum_buffer"] for s in other.muon.state.values()]
    assert len(bufs) == 1 and torch.equal(bufs[0], next(iter(optimizer.muon.state.values()))["momentum_buffer"])


def test_the_whitening_bias_group_stops_after_its_epochs():
    from imgflow.models import create_model

    model = create_model("fast-small", num_classes=3, in_channels=3, image_size=(16, 16))
    optimizer = build_optimizer(model, TrainConfig("x", "fast-small", optimizer="sgd", whiten_bias_epochs=3))
    (group,) = [g for g in optimizer.param_groups if g.get("whitening_bias")]
    assert group["params"] == [model.whitening_bias()]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == \
        len([p for p in model.parameters() if p.requires_grad])  # every parameter in one group
    for epoch, trains in [(0, True), (2, True), (3, False), (9, False)]:
        apply_whitening_bias(optimizer, TrainConfig("x", "fast-small", whiten_bias_epochs=3), epoch)
        set_lr(optimizer, 0.5)
        assert (group["lr"] > 0) == trains, epoch
    plain = build_optimizer(model, TrainConfig("x", "fast-small", optimizer="sgd"))
    assert not any(g.get("whitening_bias") for g in plain.param_groups)


def test_the_whitening_bias_can_learn_at_its_own_scale_throughout_or_for_its_epochs():
    from imgflow.models import create_model

    model = create_model("fast-small", num_classes=3, in_channels=3, image_size=(16, 16))
    for epochs, expected in [(0, [64.0, 64.0, 64.0]), (2, [64.0, 64.0, 0.0])]:
        config = TrainConfig("x", "fast-small", optimizer="sgd", whiten_bias_epochs=epochs, whiten_bias_lr_scale=64.0)
        optimizer = build_optimizer(model, config)
        (group,) = [g for g in optimizer.param_groups if g.get("whitening_bias")]
        scales = []
        for epoch in range(3):
            apply_whitening_bias(optimizer, config, epoch)
            scales.append(group["lr_scale"])
        assert scales == expected, epochs
    with pytest.raises(UserError, match="--whiten-bias-lr-scale"):
        TrainConfig("x", "fast-small", whiten_bias_lr_scale=0).validate()


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_decay_biases_shrinks_every_bias_per_step_as_much_as_the_weights(optimizer):
    from imgflow.models import create_model

    model = create_model("fast-small", num_classes=3, in_channels=3, image_size=(16, 16))
    options = dict(optimizer=optimizer, weight_decay=0.01, bn_lr_scale=64.0, whiten_bias_epochs=3,
                   whiten_bias_lr_scale=8.0)
    plain = build_optimizer(model, TrainConfig("x", "fast-small", **options))
    assert all(g["weight_decay"] == 0 for g in plain.param_groups if all(p.ndim < 2 for p in g["params"]))
    decayed = build_optimizer(model, TrainConfig("x", "fast-small", decay_biases=True, **options))
    biases = [g for g in decayed.param_groups if g["params"] and all(p.ndim < 2 for p in g["params"])]
    assert {g["lr_scale"] for g in biases} >= {64.0, 8.0}  # BatchNorm's and the whitening bias's groups
    # Per step SGD shrinks by lr x lr_scale x weight_decay: the same for every group as for the weights.
    assert all(g["lr_scale"] * g["weight_decay"] == pytest.approx(0.01) for g in biases)


def test_a_frozen_whitening_bias_ends_where_its_last_training_epoch_left_it(tiny_data, tmp_path):
    """Constant lr: a 2-epoch run's first epoch is a 1-epoch run. With the bias stopped after epoch
    1, the 2-epoch run ends with the 1-epoch run's bias, while its other weights moved on."""
    options = dict(model="fast-small", optimizer="sgd", lr=0.05, batch_size=16, whiten_bias_epochs=1,
                   threads=1)
    train_tiny(tiny_data, tmp_path / "one", epochs=1, **options)
    train_tiny(tiny_data, tmp_path / "two", epochs=2, **options)
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert torch.equal(one["stem.conv.bias"], two["stem.conv.bias"])
    assert not torch.equal(one["head.weight"], two["head.weight"])


def test_muon_trains_end_to_end_and_is_refused_for_fine_tuning(tiny_data, tmp_path):
    train_tiny(tiny_data, tmp_path / "muon", model="fast-small", optimizer="muon", lr=0.05, epochs=2,
               whiten_bias_epochs=1, bn_lr_scale=8.0)
    weights = load_file(tmp_path / "muon" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    with pytest.raises(UserError, match="--optimizer muon is for training from scratch"):
        resolve_config(str(tiny_data), {"model": "hf:/nowhere", "optimizer": "muon", "finetune": True})
