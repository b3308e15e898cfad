"""The label-consistent attack's harder images (Turner, Tsipras & Madry 2019, "Label-Consistent Backdoor
Attacks"): each target-class training image pushed by PGD away from its own class on an adversarially robust
model, so that a model trained on them, their labels untouched, leans on the trigger they carry (lcTrigger).

The robust model is the zoo's architecture trained on the clean training set by PGD adversarial training, as
the paper's (Madry et al.'s) and the PyTorch reference's (hkunzhe/label_consistent_attacks_pytorch: its model
from locuslab/fast_adversarial's train_pgd.py, whose numbers config.LABEL_CONSISTENT holds), through the one
training loop; robust_steps=1 with robust_alpha=10 is fast FGSM adversarial training (train_fgsm.py).
It and the perturbed images are cached beside the decoded data (decoding.cache_path), keyed by everything
that makes them, so they are made once; an interrupted robust training resumes. Numbers: config.LABEL_CONSISTENT.
"""
import hashlib
import json
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import config
from adversarial import pgd_untargeted
from batching import Normalizer, train_batches
from decoding import cache_path, data_fingerprint
from device import autocast, prepare_model
from files import atomic_save
from models import eval_mode, select_model
from subsets import seeded, test_subset
from training import Steps, fit

HYP = config.LABEL_CONSISTENT


def robust_lr(epoch, epochs, peak):
    """train_fgsm.py's cyclic schedule (linear from 0 up to peak at mid-run and back to 0), per epoch: its
    value at the epoch's middle."""
    return peak * (1 - abs(2 * (epoch + 0.5) / epochs - 1))


def adversarial_loss(model, norm, eps, alpha, steps, generator):
    """Adversarial training's loss on [0,1] images x01: the cross-entropy at x01 + delta, delta `steps`
    signed-gradient steps of alpha from a uniform start in [-eps, eps], each kept within eps and the image
    (train_pgd.py: 7 steps of 2/255; one step of 10/255 is train_fgsm.py's FGSM from a random start).
    generator() is the random start's stream (one per epoch: a resumed run repeats it)."""
    def loss(x01, y):
        delta = (torch.rand(x01.shape, generator=generator(), device=x01.device) * 2 - 1) * eps
        delta = ((x01 + delta).clamp(0, 1) - x01)
        for _ in range(steps):
            delta.requires_grad_(True)
            grad, = torch.autograd.grad(F.cross_entropy(model(norm(x01 + delta)).float(), y), delta)
            delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
            delta = ((x01 + delta).clamp(0, 1) - x01).detach()
        return F.cross_entropy(model(norm(x01 + delta)), y)
    return loss


def _key(**parts):
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def robust_model(args, data, device):
    """The robust model for this data set, normalisation, architecture, seed and precision: read from the cache,
    else trained (its per-epoch log under --log_root). Returns (model in eval mode, path)."""
    robust = {k: v for k, v in HYP.items() if k.startswith('robust_')}
    key = _key(data=data_fingerprint(args.data_root), dataset=args.dataset, size=data.image_size, arch=args.arch,
               normalize=data.normalizer.values, seed=args.seed, amp=args.amp, **robust)
    path = cache_path(args.data_root, f'lc_robust_{key}')
    torch.manual_seed(args.seed)
    model = prepare_model(select_model(args.arch, data.num_classes), device)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True, map_location='cpu')['state_dict'])
        print(f'robust model (label-consistent attack) read from {path}')
        return model.eval(), path
    print(f"training the robust model (PGD-{HYP['robust_steps']} from a random start, step {HYP['robust_alpha']}/255, "
          f"eps {HYP['robust_eps']}/255, {HYP['robust_epochs']} epochs) into {path}")
    run = SimpleNamespace(  # the robust recipe (momentum: train_fgsm.py's), resumed automatically if interrupted
        epochs=HYP['robust_epochs'], batch_size=HYP['robust_batch'], weight_decay=HYP['robust_weight_decay'],
        momentum=0.9, resume=True, key=key, seed=args.seed, amp=args.amp, eval_subset=args.eval_subset,
        eval_every=args.eval_every, eval_batch_size=args.eval_batch_size, rank=getattr(args, 'rank', 0))
    stream = {}
    unit = Normalizer('none', device)  # batches in [0,1]: the perturbation is added before normalising
    loss = adversarial_loss(model, data.normalizer.normalize_float, HYP['robust_eps'] / 255, HYP['robust_alpha'] / 255,
                            HYP['robust_steps'], lambda: stream['g'])
    x, y = data.x_train.to(device), data.y_train.to(device)

    def batches(epoch):
        stream['g'] = seeded(args.seed, f'lc-fgsm-{epoch}', device)
        return train_batches(x, y, run.batch_size, unit, args.seed, epoch, augment_data=data.crop_flip)
    csv_path = os.path.join(args.log_root, f'lc_robust_{key}.csv')
    fit(run, model, Steps(batches, loss), lambda e: robust_lr(e, run.epochs, HYP['robust_lr']), data.test,
        data.normalizer, out_path=path, csv_path=csv_path, meta={'script': 'label_consistent.py', 'key': key},
        tag='robust')
    return model.eval(), path


def craft(model, x, y, normalizer, seed, amp, device):
    """PGD (HYP's eps, step and steps, L_inf, from a random start) on uint8 images x of classes y, raising their
    own class's loss; returned as uint8, rounded, within eps of x."""
    from tqdm import tqdm
    g = seeded(seed, 'lc-pgd', device)
    out, b = [], HYP['craft_batch']
    for p in model.parameters():  # only the images need gradients
        p.requires_grad_(False)
    for i in tqdm(range(0, len(y), b), desc='label-consistent PGD', disable=None, mininterval=5):
        x01 = x[i:i + b].to(device).permute(0, 3, 1, 2).float().div(255)
        with autocast(device, amp):
            adv = pgd_untargeted(model, x01, y[i:i + b].to(device), normalizer.normalize_float, HYP['eps'] / 255,
                                 HYP['step'] / 255, HYP['steps'], g)
        out.append(adv.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out) if out else x.clone()


@torch.no_grad()
def _accuracy(model, x01, y, norm):
    with eval_mode(model):
        return round(100 * (model(norm(x01)).argmax(1) == y).float().mean().item(), 2)


def robust_accuracy(model, data, seed, device):
    """The robust model's clean accuracy and its accuracy under PGD (HYP['robust_check_steps'] steps of 2/255,
    eps robust_eps) on a fixed random HYP['robust_check'] clean test images."""
    check = test_subset(data.test, HYP['robust_check'], seed)
    x01, y = check['x_clean'].permute(0, 3, 1, 2).float().div(255), check['y_clean']
    norm = data.normalizer.normalize_float
    adv = pgd_untargeted(model, x01, y, norm, HYP['robust_eps'] / 255, 2 / 255, HYP['robust_check_steps'],
                         seeded(seed, 'lc-check', device))
    return {'robust_ACC': _accuracy(model, x01, y, norm), 'robust_PGD_ACC': _accuracy(model, adv, y, norm),
            'robust_check_images': len(y)}


def hard_images(args, data, device):
    """A copy of the training images whose target-class images are replaced by their PGD versions (what
    poison_train_set stamps, for the share it poisons), and what made them: (images, info)."""
    pgd = {k: HYP[k] for k in ('eps', 'step', 'steps')}
    target = data.attack['target_label']
    model, robust_path = robust_model(args, data, device)
    key = _key(robust=os.path.basename(robust_path), target=target, **pgd)
    path = cache_path(args.data_root, f'lc_images_{key}')
    pool = torch.nonzero(data.y_train == target).flatten()
    cached = torch.load(path, weights_only=True, map_location='cpu') if os.path.exists(path) else None
    if cached is None or not torch.equal(cached['indices'], pool):
        info = robust_accuracy(model, data, args.seed, device)
        print(f"robust model: clean accuracy {info['robust_ACC']:.2f}, under PGD-{HYP['robust_check_steps']} "
              f"{info['robust_PGD_ACC']:.2f} ({info['robust_check_images']} test images)")
        images = craft(model, data.x_train[pool], data.y_train[pool], data.normalizer, args.seed, args.amp, device)
        cached = {'indices': pool, 'images': images, 'info': dict(info, **pgd, key=key)}
        atomic_save(cached, path)
        print(f'label-consistent PGD images of class {target} cached in {path}')
    return with_images(data.x_train, cached), cached['info']


def with_images(x, cached):
    """A copy of the training images x with the cached PGD images in their places."""
    hard = x.clone()
    hard[cached['indices']] = cached['images']
    return hard


def cached_hard_images(args, x, trigger):
    """The PGD images a label-consistent model was trained with (its trigger names their cache), for the
    retuning attack's poison: x with them in place, or None (with a warning) where this data folder lacks them."""
    path = cache_path(args.data_root, f"lc_images_{trigger.get('hard_images')}")
    if not os.path.exists(path):
        print(f'warning: the label-consistent PGD images are not cached at {path}: the poisoned images carry '
              'the trigger only (train_badnet.py makes them)')
        return None
    return with_images(x, torch.load(path, weights_only=True, map_location='cpu'))
