"""The label-consistent attack (lcTrigger): the robust model's schedule and PGD (and FGSM) steps, the PGD images on a
hand-made linear model, DatasetBD's poisoned set, and train_badnet.py making and then reusing the cache."""
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from batching import Normalizer
from conftest import run_script, summary
from data_loader import DatasetBD
from decoding import load_dataset
from errors import UserError
from label_consistent import HYP, adversarial_loss, craft, robust_lr
from poisoning import make_attack, poison_train_set
from triggers import apply_trigger, make_trigger


def linear_model(weight=1e-4):
    """Class 0's logit is weight * (sum of the pixels), class 1's its negative: the loss of class 0 rises as
    every pixel darkens, class 1's as every pixel brightens (the gradient's sign is known everywhere)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2, bias=False))
    with torch.no_grad():
        model[1].weight[0] = weight
        model[1].weight[1] = -weight
    return model


def test_robust_lr_is_the_cyclic_triangle_at_each_epochs_middle():
    assert [round(robust_lr(e, 4, 0.2), 10) for e in range(4)] == [0.05, 0.15, 0.15, 0.05]
    assert robust_lr(7, 15, 0.2) == pytest.approx(0.2)  # the peak mid-run, as train_fgsm.py's CyclicLR


@pytest.mark.parametrize('steps, alpha', [(1, 10), (HYP['robust_steps'], HYP['robust_alpha'])])
def test_adversarial_training_steps_from_a_random_start_by_hand(steps, alpha):
    """FGSM (one step of 10/255) and the robust model's PGD (7 of 2/255): signed steps from the uniform start,
    each kept within eps and the image: on the linear model, class 0's steps darken every pixel; the loss is
    the cross-entropy where the last step ends."""
    model, eps, alpha = linear_model(), 8 / 255, alpha / 255
    x01 = torch.full((2, 3, 32, 32), 0.5)
    x01[1, :, :4] = 0.01  # near black: the image's bound clips these
    y = torch.tensor([0, 0])
    g = torch.Generator().manual_seed(0)
    loss = adversarial_loss(model, lambda v: v, eps, alpha, steps, lambda: g)(x01, y)
    delta = (torch.rand(x01.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * eps
    delta = (x01 + delta).clamp(0, 1) - x01
    for _ in range(steps):
        delta = (delta - alpha).clamp(-eps, eps)
        delta = (x01 + delta).clamp(0, 1) - x01
    assert torch.allclose(loss, F.cross_entropy(model(x01 + delta), y), atol=1e-6)
    assert (x01 + delta)[1, :, :4].min() == 0 and delta.abs().max() <= eps + 1e-7
    assert loss > F.cross_entropy(model(x01), y)  # it is an attack
    if steps > 1:  # 7 steps of 2/255 carry every start to -eps but those above 6/255: the loss is PGD's, not FGSM's
        assert (delta[0] <= -eps + 1e-6).float().mean() > 0.8


def test_pgd_images_go_to_the_eps_corner_on_the_linear_model():
    """100 PGD steps of 1.5/255 from a random start saturate at eps = 8/255 against the class: class 0's
    images 8 levels darker, class 1's 8 brighter, clipped at 0 and 255, exact after rounding to uint8."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(20, 236, (6, 32, 32, 3), generator=g, dtype=torch.uint8)
    x[0, 0, 0] = 3      # darker than eps: clipped at 0
    x[1, 0, 0] = 252    # brighter than 255 - eps: clipped at 255
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    hard = craft(linear_model(), x, y, Normalizer('none', 'cpu'), seed=0, amp=False, device=torch.device('cpu'))
    sign = torch.where(y == 0, -1, 1).view(-1, 1, 1, 1)
    assert hard.dtype == torch.uint8 and torch.equal(hard, (x.long() + 8 * sign).clamp(0, 255).to(torch.uint8))
    assert (hard.long() - x.long()).abs().max() <= HYP['eps']


def test_dataset_bd_stamps_the_pgd_images_of_the_target_class_and_keeps_every_label(image_folder):
    data = load_dataset('ImageFolder', image_folder, verbose=False)
    x, y = data['x_train'], data['y_train']
    items = list(zip(x.numpy(), y.tolist()))
    opt = SimpleNamespace(target_label=2, trig_w=3, trig_h=3, trigger_type='lcTrigger', target_type='cleanLabel', seed=4)
    hard = x.clone()
    hard[y == 2] = (x[y == 2].long() - 8).clamp(0, 255).to(torch.uint8)  # stand-in PGD images
    with pytest.raises(ValueError, match='hard_images'):
        DatasetBD(opt, items, 0.5)
    bd = DatasetBD(opt, items, 0.5, hard_images=hard)
    idx = bd.poisoned
    assert len(idx) == int((y == 2).sum() * 0.5) and (y[idx] == 2).all()
    assert torch.equal(bd.x[idx], apply_trigger(make_trigger('lcTrigger', 32), hard[idx]))
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(bd.x[rest], x[rest]) and torch.equal(bd.y, y)  # labels kept, the others untouched
    xp, yp, same = poison_train_set(x, y, bd.attack, 4, 4, hard=hard)  # what train_badnet.py trains on
    assert torch.equal(xp, bd.x) and torch.equal(same, idx)
    test = DatasetBD(opt, list(zip(data['x_test'].numpy(), data['y_test'].tolist())), 1, mode='test')
    assert torch.equal(test.x, apply_trigger(make_trigger('lcTrigger', 32), data['x_test'][data['y_test'] != 2]))


def test_label_consistent_needs_clean_label():
    flags = SimpleNamespace(trigger_type='lcTrigger', target_type='all2one', target_label=0, inject_portion=0.5,
                            trig_w=3, trig_h=3, trigger_path=None, seed=0, given=set())
    with pytest.raises(UserError, match='cleanLabel'):
        make_attack(flags, 32, 4)


@pytest.mark.slow
def test_train_badnet_makes_the_robust_model_and_images_once(image_folder, tmp_path):
    """The first run trains the robust model and crafts the images into the data folder and records what it
    made in the model's meta (the retuning attack finds the images by it); a second run reads both from there."""
    root = str(tmp_path / 'data')
    shutil.copytree(image_folder, root, ignore=shutil.ignore_patterns('.*'))
    flags = ['--dataset', 'ImageFolder', '--data_root', root, '--arch', 'WRN-10-1', '--batch_size', 32, '--lr', 0.05,
             '--trigger_type', 'lcTrigger', '--target_type', 'cleanLabel', '--inject_portion', 0.5, '--no_augment',
             '--log_root', tmp_path, '--compile', 'off', '--threads', 1]
    r = run_script('train_badnet.py', *flags, '--epochs', 4, '--output', tmp_path / 'a.tar')
    assert r.returncode == 0, r.stderr
    assert 'training the robust model' in r.stdout and 'cached in' in r.stdout
    assert summary(r.stdout)['ACC'] > 50
    made = sorted(f for f in os.listdir(root) if f.startswith('.lc_'))
    assert [f.split('_')[1] for f in made] == ['images', 'robust']
    meta = torch.load(tmp_path / 'a.tar', weights_only=True)['meta']
    info = meta['label_consistent']
    assert 0 <= info['robust_PGD_ACC'] <= 100 and info['eps'] == HYP['eps'] and info['steps'] == HYP['steps']
    assert meta['attack']['target_type'] == 'cleanLabel' and meta['attack']['trigger_type'] == 'lcTrigger'
    assert meta['attack']['trigger']['hard_images'] == info['key']
    r = run_script('retune.py', '--model', tmp_path / 'a.tar', '--data_root', root, '--epochs', 1, '--log_root',
                   tmp_path, '--threads', 1, '--retune_ratio', 0.2)  # its poison: the cached PGD images, stamped
    assert r.returncode == 0 and 'warning' not in r.stdout, r.stderr
    r = run_script('train_badnet.py', *flags, '--epochs', 1, '--output', tmp_path / 'b.tar')
    assert r.returncode == 0, r.stderr
    assert 'read from' in r.stdout and 'training the robust model' not in r.stdout and 'PGD images' not in r.stdout
    assert torch.load(tmp_path / 'b.tar', weights_only=True)['meta']['label_consistent'] == info
    r = run_script('train_badnet.py', *flags, '--target_type', 'all2one', '--output', tmp_path / 'c.tar')
    assert r.returncode != 0 and 'cleanLabel' in r.stderr and 'Traceback' not in r.stderr
    assert not os.path.exists(tmp_path / 'c.tar')


def test_the_retuning_attack_stamps_the_cached_pgd_images(image_folder, tmp_path):
    """retune_set with hard images stamps them (and only its poisoned positions); without the cache the
    retuning attack says so and stamps the clean images."""
    from poisoning import retune_set
    from label_consistent import cached_hard_images
    data = load_dataset('ImageFolder', image_folder, verbose=False)
    x, y = data['x_train'], data['y_train']
    flags = SimpleNamespace(trigger_type='lcTrigger', target_type='cleanLabel', target_label=1, inject_portion=0.5,
                            trig_w=3, trig_h=3, trigger_path=None, seed=0, given=set())
    attack = make_attack(flags, 32, 4)
    hard = (x.long() + 8).clamp(0, 255).to(torch.uint8)
    xr, yr, idx, pos = retune_set(x, y, attack, 4, 0.05, 0.2, 3, 0, hard=hard)
    assert len(pos) == 3 and (yr[pos] == 1).all()
    assert torch.equal(xr[pos], apply_trigger(attack['trigger'], hard[idx][pos]))
    rest = torch.ones(len(idx), dtype=torch.bool)
    rest[pos] = False
    assert torch.equal(xr[rest], x[idx][rest])
    args = SimpleNamespace(data_root=str(tmp_path))
    assert cached_hard_images(args, x, dict(attack['trigger'], hard_images='absent')) is None
