"""BTI-DBF(U), backdoor trigger inversion by decoupling benign features, then unlearning (Xu et al., ICLR 2024;
xuxiong0214/BTIDBF pretrain.py, btidbfu.py), and PAM on its images as PAM's own code runs it (Min et al., NeurIPS
2024; AISafety-HKUST/stable_backdoor_purification fine_tune/BTIDBF/btidbfu.py --use_sam): main_ft.py --defense
btidbf | pam-bti.

A U-Net generator (models/unet.py), in the classifier's input space, is first pre-trained to reproduce the clean
images as the model sees them (bti_pre_epochs; once per model, subset and seed, cached beside the decoded data as
the reference's pretrain.py writes its file for both scripts). Then, in each of bti_rounds rounds:
  1. decoupling: on a copy of the model (BatchNorm in training mode, as the reference), a mask over its feature map
     (sigmoid-like 0.5 + tanh/2, Adam lr 0.01, bti_mask_epochs passes) is learned so that the masked features keep
     the true class and the rest lose it: CE(head(m * f), y) - CE(head((1 - m) * f), y);
  2. inversion: the generator is trained (bti_gen_epochs passes, Adam bti_gen_lr, state kept across rounds) to keep
     the benign features (m * f) and move the others, -MSE((1-m) f) + 0.01 MSE(m f), pulled back to the images
     alone (MSE of the images) in any batch where that MSE passes bti_norm_bound or the benign one bti_feat_bound;
     from the second round on, plus CE towards the target detected in the first (the class most of its images go
     to, each with 0.03 Gaussian noise, over the defender's subset);
  3. unlearning (--epochs / bti_rounds passes): a share of each batch (bti_share) replaced by generated images at
     their true labels. BTI-DBF(U): Adam, CE + MSE between the features of the clean batch and of the mixed one.
     PAM-BTI: SGD, CE only, its gradient taken at the path-aware point towards the backdoored weights (defenses/pam).

The generator, its optimiser and the detected target are resumed with the run; each round's draws are seeded by
round, so a resumed run repeats the uninterrupted one.
"""
import copy
import hashlib
import json
import os

import torch
import torch.nn.functional as F

from adversarial import share_count
from defenses import clean_batches
from defenses.ft_at import fine_tuning_options
from checkpoints import load_checkpoint, on_cpu
from decoding import cache_path, data_fingerprint
from defenses.pam import path_aware
from device import autocast
from errors import UserError
from files import atomic_save, content_hash
from models import eval_mode
from models.unet import UNet
from subsets import seeded
from training import Steps

KEYS = {'btidbf': dict(label='BTI-DBF(U)'), 'pam-bti': dict(label='PAM-BTI')}
FINDINGS = ('bti_target', 'bti_counts')  # the class the generator's images went to after the first round's inversion,
# and how many of them went to each class (the vote)


def options(add):
    fine_tuning_options(add)  # the unlearning: --epochs (every round's together), --lr, --optimizer, ...
    add('--bti_rounds', type=int, minimum=1, help='BTI-DBF: rounds of decoupling, inversion and unlearning (--epochs '
        'are shared among them)')
    add('--bti_pre_epochs', type=int, minimum=0, help="BTI-DBF: passes pre-training the generator to reproduce the "
        "model's view of the clean images")
    add('--bti_mask_epochs', type=int, minimum=0, help='BTI-DBF: passes learning the benign-feature mask, each round')
    add('--bti_gen_epochs', type=int, minimum=0, help='BTI-DBF: passes training the generator, each round')
    add('--bti_gen_lr', type=float, minimum=0, help="BTI-DBF: the generator's Adam lr")
    add('--bti_mask_lr', type=float, minimum=0, help="BTI-DBF: the feature mask's Adam lr")
    add('--bti_norm_bound', type=float, minimum=0, help="BTI-DBF: above this MSE between generated and clean images "
        "(the model's input units) a batch only pulls the generator back")
    add('--bti_feat_bound', type=float, minimum=0, help='BTI-DBF: above this MSE of the benign features a batch only '
        'pulls the generator back')
    add('--bti_share', type=float, minimum=0, help='BTI-DBF: share of each unlearning batch replaced by generated '
        'images at their true labels')
    add('--rho', type=float, minimum=0, help='distance in weight space towards the backdoored weights where the '
        "unlearning's gradient is taken (PAM-BTI: PAM's; 0: plain gradient, BTI-DBF(U))")


def check(args):
    if args.epochs % args.bti_rounds:
        raise UserError(f'--epochs {args.epochs} must be a multiple of --bti_rounds {args.bti_rounds} (each round '
                        'unlearns as many passes)')


class Generator(torch.nn.Module):
    """The U-Net, the target its images were found to go to (-1 until the first round's detection) and the vote's
    count per class: one state, resumed with the run. Its weights train only in its own phases (requires_grad off
    otherwise, so the model's optimiser never holds them)."""
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = UNet()
        self.register_buffer('target', torch.tensor(-1))
        self.register_buffer('counts', torch.zeros(num_classes, dtype=torch.long))

    def forward(self, x):
        return self.net(x)


def features(model, x):
    return model.to_features(x)


def pretrain(gen, model, batches, args, device, log):
    """pretrain.py: the generator learns to reproduce the images as the model sees them (predictions, features,
    pixels; the pixel term weighted 100 while its MSE is above 0.1, else 0.01), by its own Adam (the inversion
    starts a fresh one, as btidbfu.py). The reference's prediction term is its cross_entropy(softmax(clean
    logits), softmax(generated logits)), kept as it is."""
    opt = torch.optim.Adam(gen.parameters(), lr=args.bti_gen_lr)
    for p in range(args.bti_pre_epochs):
        total, steps = 0.0, 0
        for x, _ in batches(f'bti-pre-{p}'):
            with autocast(device, args.amp):
                g = gen(x)
                with torch.no_grad():
                    f_clean = features(model, x)
                f_gen = features(model, g)
                out_clean, out_gen = model.from_features(f_clean), model.from_features(f_gen)
                pred = F.cross_entropy(out_clean.float().softmax(1), out_gen.float().softmax(1))
                feat = F.mse_loss(f_gen.float(), f_clean.float())
                norm = F.mse_loss(g.float(), x)
                loss = pred + feat + (100 if norm > 0.1 else 0.01) * norm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        log(f'BTI-DBF generator pre-training pass {p + 1}/{args.bti_pre_epochs}: loss {total / max(steps, 1):.4f}')


def benign_mask(model, batches, args, device, round_, log):
    """The decoupling: a feature-map mask keeping what predicts the true class, on a copy of the model in
    training mode (the reference's inv_classifier.train()); returns the mask and that copy."""
    inv = copy.deepcopy(model).train().requires_grad_(False)
    with torch.no_grad(), eval_mode(inv):
        shape = features(inv, next(iter(batches(f'bti-mask-{round_}-0')))[0][:1]).shape
    mask_tanh = torch.randn(shape, generator=seeded(args.seed, f'bti-mask-init-{round_}'), device='cpu').to(device)
    mask_tanh.requires_grad_(True)
    opt = torch.optim.Adam([mask_tanh], lr=args.bti_mask_lr)
    mask = lambda: torch.tanh(mask_tanh) / (2 + 1e-7) + 0.5
    for e in range(args.bti_mask_epochs):
        total, steps = 0.0, 0
        for x, y in batches(f'bti-mask-{round_}-{e}'):
            with autocast(device, args.amp):
                f = features(inv, x)
                m = mask()
                loss = F.cross_entropy(inv.from_features(m * f), y) - F.cross_entropy(inv.from_features((1 - m) * f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        log(f'BTI-DBF round {round_ + 1} decoupling pass {e + 1}/{args.bti_mask_epochs}: loss {total / max(steps, 1):.4f}, '
            f'mask mean {mask().mean().item():.3f}')
    return mask().detach(), inv.eval()


def invert(gen, opt, inv, mask, batches, args, device, round_, log):
    """The generator moves the backdoor features (1 - m) and keeps the benign ones (m), within its bounds."""
    target = int(gen.target)
    for e in range(args.bti_gen_epochs):
        total, steps, by_image, by_features, benign_sum = 0.0, 0, 0, 0, 0.0
        for x, _ in batches(f'bti-gen-{round_}-{e}'):
            with autocast(device, args.amp):
                g = gen(x)
                with torch.no_grad():
                    f_clean = features(inv, x).float()
                f_gen = features(inv, g).float()
                benign = F.mse_loss(mask * f_clean, mask * f_gen)
                backdoor = F.mse_loss((1 - mask) * f_clean, (1 - mask) * f_gen)
                norm = F.mse_loss(x, g.float())
                if norm > args.bti_norm_bound or benign > args.bti_feat_bound:
                    loss = norm
                    by_image += int(norm > args.bti_norm_bound)
                    by_features += int(benign > args.bti_feat_bound)
                else:
                    loss = -backdoor + 0.01 * benign
                if round_ > 0:
                    loss = loss + F.cross_entropy(inv(g), torch.full((len(x),), target, device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps, benign_sum = total + loss.item(), steps + 1, benign_sum + benign.item()
        log(f'BTI-DBF round {round_ + 1} inversion pass {e + 1}/{args.bti_gen_epochs}: loss {total / max(steps, 1):.4f}, '
            f'benign-feature MSE {benign_sum / max(steps, 1):.4f} (bound {args.bti_feat_bound:g}), last batch image MSE '
            f'{norm.item():.4f} (bound {args.bti_norm_bound:g}); batches pulled back by the image bound {by_image}, '
            f'by the feature bound {by_features}, of {steps}')


@torch.no_grad()
def detect(gen, model, batches, args, device, num_classes):
    """get_target_label: the class most generated images (each with 0.03 Gaussian noise added first) go to."""
    g = seeded(args.seed, 'bti-detect', 'cpu')
    counts = torch.zeros(num_classes, dtype=torch.long)
    with eval_mode(model):
        for x, _ in batches('bti-detect'):
            noise = 0.03 * torch.randn(x.shape, generator=g).to(device)
            with autocast(device, args.amp):
                counts += torch.bincount(model(gen(x + noise)).argmax(1).cpu(), minlength=num_classes)
    return int(counts.argmax()), counts.tolist()


def pretrained(gen, run, args, batches, log):
    """The pre-trained generator: made once per model, defender's subset, seed and pre-training recipe, and kept
    beside the decoded data (decoding.cache_path), as the reference's pretrain.py writes init_generator.pt for
    btidbf.py and btidbfu.py to load: BTI-DBF(U) and PAM-BTI of one seed share it."""
    recipe = {k: getattr(args, k) for k in ('seed', 'ratio', 'bti_pre_epochs', 'bti_gen_lr', 'batch_size', 'augment',
                                            'drop_last', 'cutout', 'amp')}
    key = hashlib.sha1(json.dumps(dict(recipe, model=content_hash(run.s_path), data=data_fingerprint(args.data_root),
                                       dataset=args.dataset, subset=hashlib.sha1(run.x.cpu().numpy().tobytes()).hexdigest()),
                                  sort_keys=True).encode()).hexdigest()[:12]
    path = cache_path(args.data_root, f'bti_pretrained_{key}')
    if os.path.exists(path):
        gen.net.load_state_dict(load_checkpoint(path)['generator'])
        log(f'BTI-DBF: the pre-trained generator of this model, subset and seed, from {path}')
        return
    with eval_mode(run.model):  # the reference's classifier.eval() while the generator learns its view
        pretrain(gen, run.model, batches, args, run.device, log)
    atomic_save({'generator': on_cpu(gen.net.state_dict()), 'recipe': recipe, 'key': key}, path)


def build(ctx):
    args, run = ctx.args, ctx
    model, device = run.model, run.device
    per_round = args.epochs // args.bti_rounds
    if not hasattr(model, 'to_features'):
        raise UserError(f'{type(model).__name__} has no feature map for BTI-DBF (to_features)')
    torch.manual_seed(args.seed)
    gen = Generator(run.data.num_classes).to(device).requires_grad_(False)
    gen_opt = torch.optim.Adam(gen.parameters(), lr=args.bti_gen_lr)
    clean = clean_batches(args, run)  # its stream name is any label: the phases draw their own orders
    log = lambda line: print(line, flush=True)
    meta = {}

    def prepare(round_):
        """Before a round's unlearning: pre-training (first round), decoupling, inversion, detection (first)."""
        gen.requires_grad_(True)
        trained = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)  # the model only passes gradients to the generator here
        if round_ == 0:
            pretrained(gen, run, args, clean, log)
        mask, inv = benign_mask(model, clean, args, device, round_, log)
        invert(gen, gen_opt, inv, mask, clean, args, device, round_, log)
        gen.requires_grad_(False)
        for p, flag in zip(model.parameters(), trained):
            p.requires_grad_(flag)
        if round_ == 0:
            target, counts = detect(gen, model, clean, args, device, run.data.num_classes)
            gen.target.fill_(target)
            gen.counts.copy_(torch.tensor(counts))
            log(f'BTI-DBF: the generated images go to class {target} (per class: {counts})')

    def batches(epoch):
        round_, within = divmod(epoch, per_round)
        if within == 0:
            prepare(round_)
        meta.update(bti_target=int(gen.target), bti_counts=gen.counts.tolist())
        for x, y in clean(epoch):
            n = share_count(args.bti_share, len(y))
            mixed = x.clone()
            with torch.no_grad(), autocast(device, args.amp):
                mixed[:n] = gen(x[:n]).float()
            yield (x, mixed), y

    if args.defense == 'pam-bti':
        loss = lambda xs, y: F.cross_entropy(model(xs[1]), y)
    else:
        def loss(xs, y):
            f_clean, f_mixed = features(model, xs[0]), features(model, xs[1])
            return F.cross_entropy(model.from_features(f_mixed), y) + F.mse_loss(f_clean.float(), f_mixed.float())
    return Steps(batches=batches, loss=loss, gradient_point=path_aware(model, args.rho),
                 extra_modules={'generator': gen, 'generator_optimizer': gen_opt}, meta=meta)
