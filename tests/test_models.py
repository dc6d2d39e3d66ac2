"""Tests for the model registry, the notebook's Keras models and the fast family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imgflow.errors import UserError
from imgflow.models import (
    count_flops,
    count_params,
    create_model,
    describe_models,
    format_models,
    get_model_spec,
    list_models,
)
from imgflow.models.layers import KerasConv2d, KerasDense, keras_same_padding

ALL_MODELS = list_models()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this module's tiny tensors on one thread: a second one only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# (channels, height, width, classes): CIFAR, Fashion-MNIST-like, the smallest size, non-square.
SHAPES = [(3, 32, 32, 10), (1, 28, 28, 7), (3, 8, 8, 10), (3, 64, 48, 10)]


def test_registry_holds_the_seed_and_fast_families():
    assert {"seed-baseline", "seed-batchnorm", "fast-small", "fast-large"} <= set(ALL_MODELS)
    for name in ALL_MODELS:
        spec = get_model_spec(name)
        assert spec.family and spec.description


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_forward_and_backward(name, shape):
    C, H, W, classes = shape
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_channels=C, image_size=(H, W))
    model.train()
    x = torch.randn(2, C, H, W)
    logits = model(x)
    assert logits.shape == (2, classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(2) % classes).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}: {pname} got an all-zero gradient"
        else:
            assert p.grad is None, f"{name}: frozen {pname} got a gradient"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_bf16_autocast_channels_last(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=(12, 12)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 12).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), torch.tensor([1, 2]))
    assert logits.shape == (2, 10) and logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_channels_last_gives_the_same_logits(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, image_size=(16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_same_seed_builds_identical_weights():
    torch.manual_seed(3)
    a = create_model("fast-small", 10).state_dict()
    torch.manual_seed(3)
    b = create_model("fast-small", 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- parameter counts, as Keras prints them in model.summary() --

def test_seed_baseline_param_count_matches_keras():
    counts = count_params(create_model("seed-baseline", 10, 3, (32, 32)))
    assert counts == {"params": 156_074, "trainable_params": 156_074, "non_trainable_params": 0}


def test_seed_batchnorm_param_count_matches_keras():
    counts = count_params(create_model("seed-batchnorm", 10, 3, (32, 32)))
    assert counts == {"params": 1_517_450, "trainable_params": 1_515_658, "non_trainable_params": 1_792}


def test_count_params_counts_running_stats_but_not_num_batches_tracked():
    counts = count_params(nn.BatchNorm2d(8))
    assert counts == {"params": 32, "trainable_params": 16, "non_trainable_params": 16}


# -- Keras faithfulness --

def test_keras_same_padding_puts_the_extra_pixel_after():
    assert keras_same_padding(4) == (1, 2)
    assert keras_same_padding(3) == (1, 1)
    assert keras_same_padding(2) == (0, 1)


@pytest.mark.parametrize("tap, shift", [((0, 0), -1), ((3, 3), 2), ((1, 1), 0)])
def test_even_kernel_same_padding_is_one_before_two_after(tap, shift):
    # A delta kernel at `tap` copies input pixel (i + tap - 1) to output i: 1 pixel of padding
    # before, so tap 0 reads one pixel up/left and tap 3 reads two down/right (2 after).
    conv = KerasConv2d(1, 1, 4)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, tap[0], tap[1]] = 1.0
    x = torch.arange(1.0, 37.0).view(1, 1, 6, 6)
    y = conv(x)
    assert y.shape == x.shape
    expected = torch.zeros(6, 6)
    for i in range(6):
        for j in range(6):
            si, sj = i + shift, j + shift
            if 0 <= si < 6 and 0 <= sj < 6:
                expected[i, j] = x[0, 0, si, sj]
    torch.testing.assert_close(y[0, 0], expected)


def test_odd_kernel_same_padding_is_symmetric():
    conv = KerasConv2d(2, 3, 3)
    assert conv.explicit_pad is None and conv.padding == (1, 1)
    assert conv(torch.randn(1, 2, 7, 5)).shape == (1, 3, 7, 5)


def test_glorot_uniform_kernels_and_zero_biases():
    torch.manual_seed(0)
    conv, dense = KerasConv2d(64, 128, 4), KerasDense(2048, 256)
    for w, fan_in, fan_out in [(conv.weight, 64 * 16, 128 * 16), (dense.weight, 2048, 256)]:
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max() <= limit
        assert w.abs().max() > 0.99 * limit
        assert abs(w.std().item() - limit / math.sqrt(3)) < 0.02 * limit
        assert abs(w.mean().item()) < 0.01 * limit
    for name in ("seed-baseline", "seed-batchnorm"):
        layers = [m for m in create_model(name, 10).modules() if isinstance(m, (KerasConv2d, KerasDense))]
        assert len(layers) == (5 if name == "seed-baseline" else 8)
        assert all(torch.count_nonzero(m.bias) == 0 for m in layers)


def test_seed_batchnorm_uses_keras_batchnorm_settings():
    model = create_model("seed-batchnorm", 10)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 7
    assert all(bn.eps == 1e-3 and bn.momentum == 0.01 for bn in bns)
    # Keras order: Conv2D(activation='relu') then BatchNormalization.
    first_block = list(model.features[0])
    assert [type(m) for m in first_block[:3]] == [KerasConv2d, nn.ReLU, nn.BatchNorm2d]
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.2, 0.25, 0.35, 0.5]


def test_seed_baseline_has_no_dropout():
    # The notebook's Dropout(0.2) line was never added to the model that ran.
    assert not any(isinstance(m, nn.Dropout) for m in create_model("seed-baseline", 10).modules())


def test_flatten_is_channels_last_like_keras():
    model = create_model("seed-baseline", 10, image_size=(16, 16))
    feats = torch.randn(1, 64, 2, 2)
    flat = model.head[0](feats)
    torch.testing.assert_close(flat, feats.permute(0, 2, 3, 1).reshape(1, -1))


# -- the fast family --

def test_fast_family_shares_one_block_and_varies_by_data():
    from imgflow.models.fast import ConvGroup, FastNet

    small, large = get_model_spec("fast-small"), get_model_spec("fast-large")
    assert small.builder is large.builder is FastNet
    assert large.kwargs["widths"] == (64, 256, 256)
    model = create_model("fast-small", 10, widths=(8, 16, 32))  # an override is a new variant
    groups = [m for m in model.modules() if isinstance(m, ConvGroup)]
    assert [g.conv.out_channels for g in groups] == [8, 16, 32]


def test_fast_batchnorm_learns_only_its_shift():
    model = create_model("fast-large", 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.weight.requires_grad and bn.bias.requires_grad for bn in bns)


def test_whitening_stem_whitens_patches():
    torch.manual_seed(0)
    model = create_model("fast-small", 10, image_size=(16, 16))
    # Strongly correlated channels and neighbouring pixels: far from white.
    base = F.avg_pool2d(torch.randn(64, 1, 18, 18), 3, stride=1)
    images = 10 * torch.cat([base, 0.5 * base + 0.1 * torch.randn_like(base), -base], dim=1)
    trainable_before = count_params(model)["trainable_params"]
    model.init_whitening(images)
    stem = model.stem
    n = stem.patch_dim
    out = F.conv2d(images, stem.conv.weight[:n])  # pre-activation, first (positive) half
    feats = out.permute(0, 2, 3, 1).reshape(-1, n).double()
    cov = feats.T @ feats / feats.shape[0]
    big = torch.diag(cov) > 0.5  # directions with real variance come out with unit variance
    assert big.sum() >= 6
    torch.testing.assert_close(cov[big][:, big], torch.eye(int(big.sum()), dtype=torch.float64),
                               atol=0.05, rtol=0)
    assert count_params(model)["trainable_params"] == trainable_before
    assert not stem.conv.weight.requires_grad


# -- errors, description, FLOPs --

def test_unknown_model_is_a_user_error_listing_known_names():
    with pytest.raises(UserError) as err:
        create_model("resnet-9000", 10)
    assert "resnet-9000" in str(err.value)
    assert all(name in str(err.value) for name in ALL_MODELS)


@pytest.mark.parametrize("kwargs", [dict(image_size=(7, 32)), dict(num_classes=0), dict(in_channels=0)])
def test_bad_sizes_are_user_errors(kwargs):
    args = dict(num_classes=10, in_channels=3, image_size=(32, 32)) | kwargs
    with pytest.raises(UserError):
        create_model("seed-baseline", **args)


def test_seed_baseline_flops_match_hand_count():
    # 2 FLOPs per multiply-add: conv k*k*C_in MACs per output value, dense in*out MACs.
    expected = 2 * (32 * 32 * 16 * 3 * 3 * 3        # conv1 at 32x32
                    + 16 * 16 * 32 * 3 * 3 * 16     # conv2 at 16x16
                    + 8 * 8 * 64 * 3 * 3 * 32       # conv3 at 8x8
                    + 4 * 4 * 64 * 128              # dense 1024 -> 128
                    + 128 * 10)                     # dense 128 -> 10
    assert count_flops(create_model("seed-baseline", 10)) == expected == 5_868_032


def test_fast_large_flops_match_airbench94():
    # airbench94 at 32x32: ~236 MFLOP forward per image.
    assert abs(count_flops(create_model("fast-large", 10)) / 1e6 - 236.3) < 0.5


def test_count_flops_leaves_the_model_as_it_found_it():
    model = create_model("seed-batchnorm", 10, image_size=(8, 8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, 3, (8, 8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_describe_and_format_models():
    rows = describe_models(num_classes=10, in_channels=3, image_size=(32, 32))
    assert [r["name"] for r in rows] == ALL_MODELS
    keys = {"name", "params", "trainable_params", "non_trainable_params", "description",
            "family", "forward_mflops"}
    assert all(keys <= set(r) for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["seed-baseline"]["params"] == 156_074
    assert by_name["seed-baseline"]["forward_mflops"] == pytest.approx(5.868, abs=0.01)
    assert by_name["seed-batchnorm"]["trainable_params"] == 1_515_658
    lines = format_models(rows).splitlines()
    assert len(lines) == len(rows) + 1
    assert "1,517,450" in lines[1 + ALL_MODELS.index("seed-batchnorm")]
    # Right-aligned numbers: the params column ends at the same place on every line.
    ends = {line.index("params") + len("params") for line in lines[:1]}
    ends |= {lines[i].index(f"{rows[i - 1]['params']:,}") + len(f"{rows[i - 1]['params']:,}")
             for i in range(1, len(lines))}
    assert len(ends) == 1


@pytest.mark.parametrize("argv, name, params", [
    (["--image-size", "4096"], "seed-baseline", 2_147_508_650),
    (["--num-classes", "100000000"], "seed-baseline", 156_074 + 129 * (100_000_000 - 10)),  # dense 128 -> K
    (["--channels", "100000"], "seed-baseline", 156_074 + 16 * 3 * 3 * 99_997),
])
def test_models_counts_any_size_without_allocating_it(argv, name, params, capsys):
    """These sizes used to be built for real: "can't allocate memory" after a minute and 11 GB."""
    import json

    from imgflow.cli import main

    assert main(["models", "--json", *argv]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[name]["params"] == params


def test_counting_on_the_meta_device_matches_a_real_model():
    rows = {r["name"]: r for r in describe_models(num_classes=5, in_channels=1, image_size=(160, 96))}
    real = create_model("seed-baseline", 5, 1, (160, 96))
    assert rows["seed-baseline"]["params"] == count_params(real)["params"]
    assert rows["seed-baseline"]["forward_mflops"] == round(count_flops(real, 1, (160, 96)) / 1e6, 2)


def test_a_model_too_large_to_train_is_refused_before_it_is_allocated():
    with pytest.raises(UserError, match=r"seed-baseline for 10 classes of 4096x4096x3 images would have "
                                        r"2,147,508,650 parameters, more than the 250,000,000"):
        create_model("seed-baseline", 10, image_size=(4096, 4096))


def _with_running_statistics(model: nn.Module) -> nn.Module:
    """`model` after a few training-mode passes (running statistics away from 0 and 1) and with
    BatchNorm biases away from 0, in eval mode: what folding has to reproduce."""
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("name", ["fast-small", "fast-large", "resnet9"])
def test_folding_batchnorm_keeps_the_logits_and_removes_every_batchnorm(name):
    model = _with_running_statistics(create_model(name, num_classes=10, in_channels=3, image_size=(32, 32)))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded = model.fold_batchnorm()
        got = folded(x)
    assert folded is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_with_a_negative_scale_is_not_folded_across_the_max_pool():
    # max(s * x) is s * min(x) for s < 0: only a positive scale commutes with the pool.
    model = create_model("fast-small", num_classes=10, in_channels=3, image_size=(32, 32))
    model = _with_running_statistics(model)
    first = model.groups[0]
    with torch.no_grad():
        first.norm.weight[0] = -1.0
        x = torch.randn(4, 3, 32, 32)
        expected = model(x)
        got = model.fold_batchnorm()(x)
    assert isinstance(first.norm, nn.BatchNorm2d)  # left in place
    assert not isinstance(first.body[1], nn.BatchNorm2d)  # the one after the body's conv is folded
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_folding_needs_eval_mode():
    model = create_model("fast-small", num_classes=10, in_channels=3, image_size=(32, 32))
    with pytest.raises(AssertionError, match="eval"):
        model.fold_batchnorm()
