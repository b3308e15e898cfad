"""The pruning defenses' pieces on hand-made layers: CLP's channel bound (pre-activation, as a WideResNet has it,
and the reference's post-activation pairing) and what it zeroes; FP's dormant channels and its accuracy bound."""
import numpy as np
import pytest
import torch

from batching import Normalizer
from defenses.clp import channel_bounds, layers, prune
from defenses.fp import prune_dormant
from models import select_model


def bn(gamma, var):
    layer = torch.nn.BatchNorm2d(len(gamma))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma))
        layer.running_var.copy_(torch.tensor(var))
    return layer.eval()


def test_clp_bound_before_the_convolution_scales_its_input_channels_by_hand():
    """BN (gamma 3, -1; var 4, 0.25: scales 1.5 and 2) -> ReLU -> 1x1 conv [[1, 2], [0, -1]]: channel 0 reads
    1.5 x and 2 y with weights 1 and 2, so its bound is |(1.5, 4)| = sqrt(18.25); channel 1's is |(0, -2)| = 2."""
    conv = torch.nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1., 2.], [0., -1.]]).view(2, 2, 1, 1))
    bounds = channel_bounds(conv, bn([3., -1.], [4., 0.25]), 'pre')
    assert torch.allclose(bounds, torch.tensor([18.25 ** 0.5, 2.0], dtype=torch.float64))
    # the reference's pairing (BN after the convolution) scales output channel k by |gamma_k| / sigma_k instead
    post = channel_bounds(conv, bn([3., -1.], [4., 0.25]), 'post')
    assert torch.allclose(post, torch.tensor([1.5 * 5 ** 0.5, 2 * 1.0], dtype=torch.float64))


def test_clp_bound_of_a_3x3_kernel_is_the_spectral_norm_of_its_scaled_rows():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 3, 3, 3, generator=g))
    norm = bn([1., -2., 0.5], [1., 4., 0.25])
    scale = np.array([1., 1., 1.])
    want = [np.linalg.svd(conv.weight[k].detach().double().numpy().reshape(3, 9) * scale[:, None],
                          compute_uv=False).max() for k in range(4)]
    assert np.allclose(channel_bounds(conv, norm, 'pre').numpy(), want)  # |gamma| / sigma = 1, 1, 1
    # an upper bound: for any input patch, |channel k's output change| <= bound * |patch change|
    x, dx = torch.randn(64, 3, 3, 3, generator=g), torch.randn(64, 3, 3, 3, generator=g)
    f = lambda v: conv(torch.relu(norm(v)))[:, :, 0, 0]
    ratio = (f(x + dx) - f(x)).abs() / dx.flatten(1).norm(dim=1, keepdim=True)
    assert (ratio <= channel_bounds(conv, norm, 'pre').float() + 1e-5).all()


def test_clp_pairs_every_wideresnet_convolution_with_the_bn_before_it_and_prunes_its_outliers():
    model = select_model('WRN-10-1', 4).eval()
    pairs = layers(model)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(map(id, (c for c, _, _ in pairs))) == sorted(map(id, convs))  # every convolution, once
    assert pairs[0] == (model.conv1, None, 'pre')
    block = model.block1.layer[0]
    assert (block.conv2, block.bn2, 'pre') in pairs and (block.conv1, block.bn1, 'pre') in pairs
    with torch.no_grad():
        block.conv2.weight[5] *= 50  # one channel far above its layer's others
    zeroed, total = prune(model, 3.0)
    assert total >= 1 and (block.conv2.weight[5] == 0).all()
    assert any(t is block.conv2.weight and m[5] for t, m in zeroed)
    x = torch.randn(2, 3, 32, 32)
    inner = torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(model.conv1(x))))))
    assert (block.conv2(inner)[:, 5] == 0).all()  # the pruned channel outputs 0
    resnet = select_model('ResNet18', 4)
    assert all(order == 'post' for _, _, order in layers(resnet)) and len(layers(resnet)) == 20


class Channels(torch.nn.Module):
    """Pooled features = each input channel's mean; a linear head on them (as a WRN's fc)."""

    def __init__(self, weight):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x, features=False):
        pooled = x.mean((2, 3))
        logits = self.fc(pooled)
        return (logits, None, pooled) if features else logits


def test_fp_prunes_the_dormant_channel_and_stops_where_accuracy_would_fall():
    """Red carries class 0, green class 1, blue is dark in every image (dormant) but weighs on the head: pruning
    blue costs nothing; pruning the next (the weaker of red and green) costs half the accuracy: FP stops at 1."""
    n = 40
    y = torch.arange(n) % 2
    x = torch.zeros(n, 8, 8, 3, dtype=torch.uint8)
    x[y == 0, ..., 0] = 200
    x[y == 1, ..., 1] = 150
    x[..., 2] = 2
    model = Channels(torch.tensor([[1., 0., 5.], [0., 1., 5.]]))
    pruned, acc = prune_dormant(model, x, y, Normalizer('none', 'cpu'), 0.1, 0.01, 16, log=lambda s: None)
    assert pruned.tolist() == [False, False, True] and acc == 100.0
    assert model.fc.weight[:, 2].abs().sum() == 0 and model.fc.weight[:, :2].abs().sum() == 2
    # a looser bound (60%) lets it prune green too (accuracy 50, a 50% drop), never the last channel standing
    model = Channels(torch.tensor([[1., 0., 5.], [0., 1., 5.]]))
    pruned, acc = prune_dormant(model, x, y, Normalizer('none', 'cpu'), 0.6, 0.01, 16, log=lambda s: None)
    assert pruned.tolist() == [False, True, True] and acc == pytest.approx(50.0)


def test_anp_masked_norm_is_the_norm_at_mask_one_and_perturbs_weight_and_bias_as_the_reference():
    from defenses.anp import MaskedNorm, unwrap, wrap
    norm = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1., 2., 3.]))
        norm.bias.copy_(torch.tensor([0.5, -1., 2.]))
    norm.eval()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    masked = MaskedNorm(norm).eval()
    assert torch.allclose(masked(x), norm(x))
    with torch.no_grad():
        masked.neuron_mask.copy_(torch.tensor([1., 0., 0.5]))
    masked.noise, masked.noise_bias, masked.perturbed = torch.tensor([0.1, 0.2, -0.4]), torch.tensor([0.4, 0., -0.1]), True
    z = (x - norm.running_mean.view(1, 3, 1, 1)) / (norm.running_var.view(1, 3, 1, 1) + norm.eps).sqrt()
    want = z * (norm.weight * torch.tensor([1.1, 0.2, 0.1])).view(1, 3, 1, 1) \
        + (norm.bias * torch.tensor([1.4, 1., 0.9])).view(1, 3, 1, 1)
    assert torch.allclose(masked(x), want, atol=1e-6)
    model = select_model('WRN-10-1', 4)
    keys = list(model.state_dict())
    masks = wrap(model)
    assert len(masks) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in select_model('WRN-10-1', 4).modules())
    assert 'bn1.neuron_mask' in dict(model.named_parameters()) and 'bn1' in masks
    unwrap(model)
    assert list(model.state_dict()) == keys  # every script loads the pruned model


def test_anp_loss_without_perturbation_is_the_masked_models_cross_entropy_and_the_perturbation_raises_it():
    from defenses.anp import anp_loss, wrap
    torch.manual_seed(0)
    model = select_model('WRN-10-1', 4).train()
    masks = list(wrap(model).values())
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    g = torch.Generator().manual_seed(1)
    clean = anp_loss(model, masks, 0.0, 1, 0.2, lambda: g)(x, y)
    assert torch.allclose(clean, 0.2 * torch.nn.functional.cross_entropy(model(x), y))
    both = anp_loss(model, masks, 0.4, 1, 0.0, lambda: g)(x, y)  # alpha 0: the perturbed loss alone
    assert both > torch.nn.functional.cross_entropy(model(x), y)  # the adversarial neurons hurt
    assert not any(m.perturbed for m in masks)


def test_rnp_unlearning_ascends_the_loss_and_stops_at_the_floor():
    from types import SimpleNamespace

    from defenses.rnp import unlearn
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.arange(64) % 2
    x[:, 0] += 3 * (2 * y - 1)  # feature 0 tells the classes apart
    model = torch.nn.Sequential(torch.nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[1, 0], model[0].weight[0, 0] = 1.0, -1.0  # starts right
    args = SimpleNamespace(rnp_unlearn_lr=0.5, momentum=0.9, rnp_unlearn_weight_decay=0.0, rnp_unlearn_milestones=(10,),
                           rnp_unlearn_epochs=30, rnp_floor=0.2, amp=False)
    before = torch.nn.functional.cross_entropy(model(x), y)
    passes = unlearn(model, lambda epoch: [(x, y)], args, torch.device('cpu'))
    assert 1 < passes <= 31 and torch.nn.functional.cross_entropy(model(x), y) > before
    assert (model(x).argmax(1) == y).float().mean() <= 0.2  # the last pass ran at or below the floor
    assert unlearn(model, lambda epoch: [(x, y)], dict_args(args, rnp_floor=1.0), torch.device('cpu')) == 1


def dict_args(args, **changes):
    from types import SimpleNamespace
    return SimpleNamespace(**dict(vars(args), **changes))


def test_rnp_data_is_the_first_part_of_the_defenders_subset():
    """RNP's 1% (--rnp_ratio) is cut from the same seeded draw as the defender's 5%: every one of its images is in
    the defender's subset, and there are as many as the reference's share of the training set."""
    from subsets import clean_subset
    x = torch.arange(2000).view(-1, 1)  # each image its own index
    y = torch.arange(2000) % 10
    for seed in (0, 1):
        part, whole = clean_subset(x, y, 0.01, seed), clean_subset(x, y, 0.05, seed)
        assert len(part[1]) == 20 and len(whole[1]) == 100
        assert set(part[0].flatten().tolist()) <= set(whole[0].flatten().tolist())
    assert set(clean_subset(x, y, 0.01, 0)[0].flatten().tolist()) != set(clean_subset(x, y, 0.01, 1)[0].flatten().tolist())
