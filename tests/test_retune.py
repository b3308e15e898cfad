"""The retuning attack's data, per-class accuracy, and the defender-side collapse warning."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from batching import Normalizer
from conftest import make_images, run_script, summary
from defenses import defender_check
from metrics import evaluate
from poisoning import make_test_sets, retune_set
from subsets import clean_subset
from triggers import make_trigger


def attack(kind='all2one'):
    return dict(target_type=kind, target_label=0, inject_portion=0.1, trig_w=3, trig_h=3,
                trigger=make_trigger('gridTrigger', 32))


@pytest.mark.parametrize('kind', ['all2one', 'cleanLabel'])
def test_retune_data_is_disjoint_from_the_clean_subset_and_holds_exactly_5_poisoned(kind):
    x, y = (torch.as_tensor(a) for a in make_images(100, seed=0))  # 400 images, 4 classes
    x = x.clone()
    x[:, 29:32, 29:32] = 7  # no clean image already carries the grid's pixels
    xr, yr, idx, pos = retune_set(x, y, attack(kind), 4, defense_ratio=0.25, ratio=0.1, poisoned=5, seed=3)
    assert len(idx) == 40 and len(pos) == 5
    # the defender's subset for the same seed and ratio: rebuild its indices from its images
    xc, _ = clean_subset(torch.arange(400)[:, None], y, 0.25, seed=3)
    assert not set(idx.tolist()) & set(xc.flatten().tolist())
    stamped = (xr[:, 29:32, 29:32] != 7).flatten(1).any(1)
    assert stamped.sum() == 5 and stamped[pos].all()
    assert (yr[pos] == 0).all() and torch.equal(yr[~stamped], y[idx][~stamped])  # only the poisoned are relabelled
    if kind == 'all2one':
        assert (y[idx][pos] != 0).all()   # flipping images of the target class would teach nothing
    else:
        assert (y[idx][pos] == 0).all()   # clean-label: target-class images, labels kept


class Constant(nn.Module):
    """Predicts class `c` for every image: a model a defense has collapsed."""

    def __init__(self, c=1):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 4)
        out[:, self.c] = 1
        return out + self.w


def test_per_class_accuracies_weighted_by_class_size_average_to_acc_all():
    x, y = (torch.as_tensor(a) for a in make_images(30, seed=1))
    keep = torch.cat([torch.arange(0, 30), torch.arange(30, 40), torch.arange(60, 80), torch.arange(90, 120)])
    x, y = x[keep], y[keep]  # classes of 30, 10, 20, 30 images
    test = make_test_sets(x, y, attack(), 4)
    m = evaluate(Constant(1), test, Normalizer('none', 'cpu'), batch_size=16)
    assert m['per_class'] == [0.0, 100.0, 0.0, 0.0] and m['ACC_target'] == 0.0
    sizes = torch.bincount(y, minlength=4).float()
    assert abs(float((torch.tensor(m['per_class']) * sizes).sum() / sizes.sum()) - m['ACC_all']) < 0.01
    assert m['ACC_all'] == round(100 * 10 / 90, 2) and m['ACC'] == round(100 * 10 / 60, 2)


def test_the_warning_fires_when_a_defense_collapses_the_model(capsys):
    x, y = (torch.as_tensor(a) for a in make_images(10, seed=2))
    run = SimpleNamespace(x=x, y=y, data=SimpleNamespace(normalizer=Normalizer('none', 'cpu')), subset_before=96.0)
    args = SimpleNamespace(eval_batch_size=16, amp=False)
    m = defender_check(run, Constant(2), args, {})
    assert m['subset_after'] == 25.0 and 'from 96.00 to 25.00' in m['warning']
    assert 'warning: ' in capsys.readouterr().out
    run.subset_before = 30.0  # a fall of 5 points is no collapse
    assert defender_check(run, Constant(2), args, {})['warning'] is None


@pytest.mark.slow
def test_retune_fine_tunes_on_its_own_draw_and_writes_a_model_only_with_output(backdoored, image_folder, tmp_path):
    flags = ['--model', backdoored['path'], '--dataset', 'ImageFolder', '--data_root', image_folder, '--ratio', 0.25,
             '--retune_ratio', 0.25, '--log_root', tmp_path / 'logs', '--batch_size', 32]
    r = run_script('retune.py', *flags, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '100 training images (0.25), 5 poisoned with squareTrigger' in r.stdout, r.stdout
    assert sorted(os.listdir(tmp_path)) == ['logs'] and os.listdir(tmp_path / 'logs') == ['retune_bd.csv']
    epochs = [line.split(',')[0] for line in (tmp_path / 'logs' / 'retune_bd.csv').read_text().splitlines()[1:]]
    assert epochs == ['0', '1', '2', '3', '4', '5']  # the model as given, then 5 epochs
    r2 = run_script('retune.py', *flags, '--output', tmp_path / 'retuned.tar', cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert summary(r2.stdout) == summary(r.stdout)  # seeded: the same run
    ckpt = torch.load(tmp_path / 'retuned.tar', weights_only=True)
    assert ckpt['meta']['retuned'] and ckpt['metrics']['ASR'] == summary(r.stdout)['ASR']


@pytest.mark.slow
def test_attack_from_scores_a_model_under_another_checkpoints_attack(backdoored, image_folder, tmp_path):
    ckpt = torch.load(backdoored['path'], weights_only=True)
    other = dict(ckpt['meta']['attack'], target_label=1)  # the same patch, another target
    torch.save(dict(ckpt, meta=dict(ckpt['meta'], attack=other)), tmp_path / 'other.tar')
    torch.save({'state_dict': ckpt['state_dict']}, tmp_path / 'no-meta.tar')
    flags = ['--model', backdoored['path'], '--dataset', 'ImageFolder', '--data_root', image_folder]
    r = run_script('evaluate.py', *flags, '--attack_from', tmp_path / 'other.tar', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'scoring against the attack of' in r.stdout and 'target 1' in r.stdout
    m = summary(r.stdout)
    assert m['ASR'] <= 5 < backdoored['metrics']['ASR']  # the patch sends images to 0: class 1 is no target
    r = run_script('retune.py', *flags, '--attack_from', tmp_path / 'no-meta.tar', cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().endswith('its meta holds no attack'), r.stderr
