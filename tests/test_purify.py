"""The fine-tuning defenses' pieces on hand-checked inputs (PAM's step, FST's penalty and norm, SAU's
masks and losses, PGD's bounds, MCL-TK's loss) and each defense end to end on the planted backdoor."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adversarial import pgd_untargeted, with_adversarial_share, with_pattern_share
from conftest import IN_THE_TABLE_TEST, run_script, summary, toy_flags
from defenses import registry
from defenses.fst import fst_penalty, keep_norm, reinit_head
from defenses.mcl import contrastive_loss, keep_target_loss
from defenses.pam import path_aware_point
from defenses.sau import js_divergence, shared_mask, shared_unlearning_loss
from training import train_epoch


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def test_path_aware_point_moves_rho_towards_the_backdoored_weights_and_restores_exactly():
    net = tiny_net()
    params = list(net.parameters())
    bd = [p.detach().clone() + torch.randn_like(p) for p in params]  # theta_bd, away from theta
    theta = [p.detach().clone() for p in params]
    dist = torch.sqrt(sum(((b - t) ** 2).sum() for b, t in zip(bd, theta)))
    with path_aware_point(params, bd, 0.5):
        moved = [p.detach().clone() for p in params]
    for m, t, b in zip(moved, theta, bd):
        assert torch.allclose(m, t + 0.5 * (b - t) / dist, atol=1e-6)
    assert all(torch.equal(p, t) for p, t in zip(params, theta))  # bit-exact, not theta + e - e
    moved_by = torch.sqrt(sum(((m - t) ** 2).sum() for m, t in zip(moved, theta)))
    assert abs(float(moved_by) - 0.5) < 1e-5
    with path_aware_point(params, theta, 0.5):  # at theta_bd itself the direction is zero: no move
        assert all(torch.equal(p, t) for p, t in zip(params, theta))


def test_a_pam_step_applies_the_gradient_of_the_moved_point_at_the_weights():
    net = tiny_net()
    params = list(net.parameters())
    bd = [p.detach().clone() + 0.3 * torch.randn_like(p) for p in params]
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    theta = [p.detach().clone() for p in params]
    # the expected step: the gradient of a copy moved to the path-aware point, taken from theta
    probe = copy.deepcopy(net)
    dist = torch.sqrt(sum(((b - t) ** 2).sum() for b, t in zip(bd, theta)))
    with torch.no_grad():
        for p, t, b in zip(probe.parameters(), theta, bd):
            p.copy_(t + 0.5 * (b - t) / dist)
    grads = torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))
    opt = torch.optim.SGD(params, lr=0.1)
    train_epoch(net, opt, lambda xb, yb: F.cross_entropy(net(xb), yb), [(x, y)], 0.1, False,
                gradient_point=lambda: path_aware_point(params, bd, 0.5))
    for p, t, g in zip(params, theta, grads):
        assert torch.allclose(p.detach(), t - 0.1 * g, atol=1e-6)
    # and it is not plain SGD: the gradient at theta itself differs
    at_theta = copy.deepcopy(probe)
    with torch.no_grad():
        for p, t in zip(at_theta.parameters(), theta):
            p.copy_(t)
    plain = torch.autograd.grad(F.cross_entropy(at_theta(x), y), list(at_theta.parameters()))
    assert max(float((g - h).abs().max()) for g, h in zip(grads, plain)) > 1e-3


def test_fst_penalty_and_the_kept_head_norm():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    w_orig = torch.tensor([[0.5, 0.0], [1.0, 2.0]])
    assert float(fst_penalty(w, w_orig, 0.1)) == pytest.approx(0.1 * (0.5 + 3.0 - 2.0))
    keep_norm(w, torch.tensor(2.0))
    assert float(w.norm()) == pytest.approx(2.0)
    assert torch.allclose(w / w.norm(), torch.tensor([[1.0, 2.0], [3.0, -1.0]]) / 15 ** 0.5)  # direction kept
    head = nn.Linear(64, 10)
    reinit_head(head, torch.Generator().manual_seed(0))
    assert head.weight.abs().max() <= 1 / 8 and head.bias.abs().max() <= 1 / 8 and head.weight.std() > 0.05


def test_fst_penalty_gradient_turns_the_head_away_from_the_original():
    w_orig = torch.randn(10, 64)
    w = w_orig.clone().requires_grad_(True)
    fst_penalty(w, w_orig, 0.2).backward()
    assert torch.allclose(w.grad, 0.2 * w_orig)  # descending it lowers <W, W_orig>


def test_sau_shared_mask_on_hand_made_predictions():
    pred = torch.tensor([1, 2, 0, 3, 1])
    pred_ref = torch.tensor([1, 2, 1, 3, 0])
    clean = torch.tensor([0, 2, 0, 0, 0])
    clean_ref = torch.tensor([0, 0, 0, 0, 1])
    # 0: both moved to 1 (shared); 1: current model not moved; 2: current not moved;
    # 3: both moved to 3 (shared); 4: both moved, to different labels
    assert shared_mask(pred, pred_ref, clean, clean_ref).tolist() == [True, False, False, True, False]


def test_sau_unlearning_loss_value_and_mask():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.9995, 0.0004, 0.0001]]))
    y = torch.tensor([0, 1, 2, 1])
    pred_ref_adv = torch.tensor([1, 1, 0, 2])  # image 1: the reference was not fooled (its true label)
    clean_ref = torch.tensor([0, 1, 0, 1])     # image 2: fooled into 0, but 0 was its clean prediction: not moved
    loss = shared_unlearning_loss(logits, pred_ref_adv, y, clean_ref)  # image 3: p_k = 0.0001 < 0.001, dropped
    assert loss.item() == pytest.approx(-torch.log(torch.tensor(0.8)).item() / 4, rel=1e-4)  # only image 0: 1 - 0.2
    assert shared_unlearning_loss(logits, y, y, clean_ref).item() == 0.0


def test_sau_unlearning_loss_keeps_its_gradient_on_a_saturated_model():
    logits = torch.tensor([[30.0, 0.0, 0.0]], requires_grad=True)  # p_0 = 1 - 2e-13: 1.0 in float
    loss = shared_unlearning_loss(logits, torch.tensor([0]), torch.tensor([1]), torch.tensor([1]))
    loss.backward()
    assert loss.item() == pytest.approx(30 - float(torch.log(torch.tensor(2.0))), rel=1e-4)
    assert logits.grad[0, 0] > 0.9  # descending it lowers the adversarial label's logit


def test_js_divergence_is_zero_for_equal_and_symmetric_and_bounded():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.allclose(js_divergence(a, a), torch.zeros(4), atol=1e-6)
    assert torch.allclose(js_divergence(a, b), js_divergence(b, a), atol=1e-6)
    far = js_divergence(torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]]))
    assert float(far) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-3)


def test_pgd_stays_in_the_ball_and_the_image_range_and_raises_the_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).train()
    x = torch.rand(32, 3, 4, 4)
    y = net(x).argmax(1)
    adv = pgd_untargeted(net, x, y, lambda t: t, 0.1, 0.03, 5, torch.Generator().manual_seed(0))
    assert net.training  # left as it was
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(net(adv), y) > F.cross_entropy(net(x), y) + 0.05
    mixed = with_adversarial_share(net, x, y, lambda t: t, 0.25, 0.1, 0.03, 5, torch.Generator().manual_seed(0))
    assert torch.equal(mixed[8:], x[8:]) and not torch.equal(mixed[:8], x[:8])  # exactly a quarter replaced
    pattern = torch.zeros(3, 4, 4)
    pattern[:, 0, 0] = 1.0
    stamped = with_pattern_share(x, pattern, 0.25)
    assert torch.equal(stamped[8:], x[8:]) and (stamped[:8, :, 0, 0] == 1).all()


class Feats(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.fc = nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x, features=False):
        f = torch.relu(self.body(x.flatten(1)))
        return (self.fc(f), None, f) if features else self.fc(f)


def test_mcl_tk_leaves_the_target_images_out_of_the_contrastive_term_and_adds_clean_ce():
    net = Feats()
    x01 = torch.rand(6, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    pattern = torch.zeros(3, 2, 2)
    pattern[:, 0, 0] = 0.5
    pos, neg = torch.randn(6, 6), torch.randn(6, 6)
    pushed = torch.tensor([False, True, True, False, True, True])
    loss = keep_target_loss(net, x01, y, pattern, lambda t: t, pos, neg, pushed, 0.5)
    _, _, f_trig = net((x01 + pattern).clamp(0, 1), features=True)
    expect = contrastive_loss(f_trig[pushed], pos[pushed], neg[pushed], 0.5) + F.cross_entropy(net(x01), y)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    # changing the left-out rows' frozen features changes nothing
    pos2, neg2 = pos.clone(), neg.clone()
    pos2[~pushed], neg2[~pushed] = 100.0, -100.0
    assert keep_target_loss(net, x01, y, pattern, lambda t: t, pos2, neg2, pushed, 0.5).item() == pytest.approx(loss.item())
    nobody = keep_target_loss(net, x01, y, pattern, lambda t: t, pos, neg, torch.zeros(6, dtype=torch.bool), 0.5)
    assert nobody.item() == pytest.approx(F.cross_entropy(net(x01), y).item(), rel=1e-5)


def common(backdoored, image_folder, tmp_path):
    return ['--dataset', 'ImageFolder', '--data_root', image_folder, '--s_model', backdoored['path'], '--ratio', 0.5,
            '--checkpoint_root', tmp_path / 'w', '--log_root', tmp_path / 'logs', '--device', 'cpu']


# what a defense's run says beyond its scores, where it says something of its own
SAYS = {
    'ft-si': "synthesised trigger: class 0's inverted pattern",
    'argd-si': 'synthesised trigger: class 0',
    'nc': 'NC: flagged class 0 (index',
    'mcr': "MCR: the curve's point t = ",
    'mcl-tk': 'left out of the contrastive term',
    'anp': 'ANP: ', 'rnp': 'RNP: ', 'fp': 'FP: ', 'clp': 'CLP: ',  # how many it pruned
    'btidbf': 'BTI-DBF: the generated images go to class 0', 'pam-bti': 'BTI-DBF: the generated images go to class 0',
}


@pytest.mark.slow
@pytest.mark.parametrize('name', [k for k, spec in registry().items() if k not in IN_THE_TABLE_TEST and not spec.filter])
def test_each_defense_erases_the_planted_backdoor(name, backdoored, image_folder, tmp_path):
    """Every registered defense (those of the table's test aside) through the one driver at its recipe with fewer
    epochs and a toy-sized batch: the backdoor goes, the clean accuracy stays, the model and its CSV are written."""
    r = run_script('main_ft.py', *common(backdoored, image_folder, tmp_path), *toy_flags(name))
    assert r.returncode == 0, r.stderr
    m = summary(r.stdout)
    assert backdoored['metrics']['ASR'] >= 90 and m['ASR'] <= 20 and m['ACC'] >= 80, r.stdout
    if name == 'mcl-tk':  # told the target, it keeps the target class
        assert m['ACC_target'] >= 80, r.stdout
    written = [p for p in (tmp_path / 'w').rglob('bd*.tar') if p.parent.name not in ('t_net', 'mcr_end')]
    assert len(written) == 1 and list((tmp_path / 'logs').glob('*_bd.csv')), (written, r.stdout)
    assert SAYS.get(name, '') in r.stdout, r.stdout
    if 'teacher' in registry()[name].needs:  # fine-tuned first where none was given
        assert (tmp_path / 'w' / 't_net' / 'bd.tar').exists()
    if 'end' in registry()[name].needs:  # made beside the model, FT's teacher not made
        assert list((tmp_path / 'w').rglob('mcr_end/bd.tar')) and not (tmp_path / 'w' / 't_net').exists()


# a registry key and the flags that chose the same defense before it had one (today's README commands)
SAME_DEFENSE = [
    ('main_ft.py', ['--defense', 'ft-si'], ['--defense', 'ft-at', '--source', 'inverted'], 'ft-si_net/bd.tar'),
    ('main-ARGD.py', ['--defense', 'argd-si'], ['--source', 'inverted'], 'erasing_net/bd-si.tar'),
    ('main_mcl.py', ['--defense', 'mcl-tk', '--mcl_target', 0, '--inv_epochs', 3], ['--mcl_target', 0, '--inv_epochs', 3,
                                                                                   '--keep_target'], 'mcl-tk_net/bd.tar'),
]


@pytest.mark.slow
@pytest.mark.parametrize('script, key, flags, out', SAME_DEFENSE, ids=[k[1] for _, k, _, _ in SAME_DEFENSE])
def test_a_registry_key_runs_exactly_what_its_old_flags_ran(script, key, flags, out, backdoored, image_folder, tmp_path):
    """The table's cells now name a defense by its key: every tensor it writes equals the old command's (on the
    CPU, whose runs repeat bit for bit)."""
    models = []
    for i, chosen in enumerate((key, flags)):
        run_flags = [*common(backdoored, image_folder, tmp_path / str(i)), '--epochs', 1, '--batch_size', 32,
                     '--precision', 'fp32', '--device', 'cpu', '--t_model', tmp_path / 'teacher.tar', *chosen]
        if script != 'main-ARGD.py':
            run_flags = run_flags[:run_flags.index('--t_model')] + run_flags[run_flags.index('--t_model') + 2:]
        r = run_script(script, *run_flags)
        assert r.returncode == 0, r.stderr
        models.append(torch.load(tmp_path / str(i) / 'w' / out, weights_only=True)['state_dict'])
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_argd_and_mcl_refuse_the_path_aware_step_they_do_not_keep(backdoored, image_folder, tmp_path):
    for script in ('main-ARGD.py', 'main_mcl.py'):
        r = run_script(script, *common(backdoored, image_folder, tmp_path), '--rho', 0.5)
        assert r.returncode != 0 and 'unrecognized arguments: --rho' in r.stderr, (script, r.stderr)


@pytest.mark.slow
def test_interpolation_runs_from_the_backdoored_to_the_defended_model(backdoored, image_folder, tmp_path):
    flags = common(backdoored, image_folder, tmp_path)
    r = run_script('main_ft.py', *flags, '--defense', 'fst', '--epochs', 6, '--batch_size', 32)
    assert r.returncode == 0, r.stderr
    defended = summary(r.stdout)
    r = run_script('interpolate.py', '--model', tmp_path / 'w' / 'fst_net' / 'bd.tar', '--from', backdoored['path'],
                   '--dataset', 'ImageFolder', '--data_root', image_folder, '--points', 5, '--eval_subset', 0, '--json')
    assert r.returncode == 0, r.stderr
    path = json.loads(r.stdout.strip().splitlines()[-1])['path']
    assert [p['t'] for p in path] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert path[0]['ASR'] == backdoored['metrics']['ASR'] and path[-1]['ASR'] == defended['ASR']
    assert path[-1]['ACC'] == defended['ACC']
    r = run_script('interpolate.py', '--model', backdoored['path'], '--dataset', 'ImageFolder', '--data_root',
                   image_folder)
    assert r.returncode == 2 and 'needs --from' in r.stderr
