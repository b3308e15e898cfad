"""A probe of BTI-DBF(U)'s first round (results/log.md, 2026-12-07 midday), not part of the defense: after the
decoupling, and after every inversion pass, where the real trigger's feature change lies against the benign mask,
the generator's objective on 500 clean test images beside the real trigger's, and the vote over the defender's
subset. The trigger and test images are read for the diagnosis only; the defense never sees them. Stops after the
first round's detection.

    PYTHONPATH=. python results/btidbf_probe.py --defense btidbf --bti_rounds 1 --epochs 1 --bti_gen_epochs 10 \
        --s_model weight/zoo/badnet.tar --data_root $CIFAR --seed 0 --threads 1 --output /tmp/probe.tar [--bti_feat_bound 10]
"""
import sys

import torch
import torch.nn.functional as F

import defenses.btidbf as bti
from cli import main_guard, parse_args
from defenses.driver import defend

state = {}
benign_mask, invert, detect, build = bti.benign_mask, bti.invert, bti.detect, bti.build


def features(model, x):
    with torch.no_grad():
        return bti.features(model, x).float()


def objective(mask, f_clean, f_other):
    """The inversion's terms for a change of the features: benign MSE, backdoor MSE, -backdoor + 0.01 benign."""
    benign = F.mse_loss(mask * f_clean, mask * f_other).item()
    backdoor = F.mse_loss((1 - mask) * f_clean, (1 - mask) * f_other).item()
    return f'benign MSE {benign:.4f} backdoor MSE {backdoor:.4f} objective {-backdoor + 0.01 * benign:.4f}'


def outside(mask, f_clean, f_other):
    """The share of the squared feature change that lies outside the benign mask."""
    change = (f_other - f_clean) ** 2
    return ((1 - mask) * change).sum().item() / change.sum().item()


def analyse(mask, inv, tag, gen=None):
    data = state['data']
    x_clean = data.normalizer(data.test['x_clean'][data.test['nontarget']][:500])
    x_bd = data.normalizer(data.test['x_bd'][:500])
    f_clean, f_bd = features(inv, x_clean), features(inv, x_bd)
    line = (f'PROBE {tag}: real trigger: image MSE {F.mse_loss(x_bd, x_clean).item():.4f} {objective(mask, f_clean, f_bd)}, '
            f'share of its feature change outside the mask {outside(mask, f_clean, f_bd):.3f} (the mask leaves out '
            f'{(1 - mask).mean().item():.3f}); clean features mean square {f_clean.pow(2).mean().item():.4f}')
    if gen is not None:
        with torch.no_grad():
            g = gen(x_clean).float()
            votes = torch.bincount(inv(g).argmax(1), minlength=data.num_classes).tolist()
        f_gen = features(inv, g)
        cosine = F.cosine_similarity((f_gen - f_clean).flatten(1), (f_bd - f_clean).flatten(1)).mean().item()
        line += (f' | generator: image MSE {F.mse_loss(g, x_clean).item():.4f} {objective(mask, f_clean, f_gen)}, '
                 f'outside share {outside(mask, f_clean, f_gen):.3f}, cosine to the trigger\'s change {cosine:.3f}, '
                 f'classes of its test images {votes}')
    print(line, flush=True)


def probed_mask(model, batches, args, device, round_, log):
    mask, inv = benign_mask(model, batches, args, device, round_, log)
    analyse(mask, inv, 'after decoupling')
    return mask, inv


def probed_invert(gen, opt, inv, mask, batches, args, device, round_, log):
    passes, args.bti_gen_epochs = args.bti_gen_epochs, 1
    for p in range(passes):
        invert(gen, opt, inv, mask, lambda name: batches(f'{name}-p{p}'), args, device, round_, log)
        analyse(mask, inv, f'pass {p + 1}', gen)
        target, counts = detect(gen, state['model'], batches, args, device, state['data'].num_classes)
        print(f'PROBE pass {p + 1}: the vote over the subset (0.03 noise) {target} {counts}', flush=True)
    args.bti_gen_epochs = passes


def probed_detect(*args):
    target, counts = detect(*args)
    print(f'PROBE the first round\'s vote {target} {counts}', flush=True)
    sys.exit(0)


def probed_build(ctx):
    state['data'], state['model'] = ctx.data, ctx.model
    return build(ctx)


bti.benign_mask, bti.invert, bti.detect, bti.build = probed_mask, probed_invert, probed_detect, probed_build
if __name__ == '__main__':
    main_guard(lambda: defend(parse_args('main_ft.py', description='BTI-DBF probe')))
