"""Refool, the reflection backdoor (Liu, Ma, Bailey & Lu, ECCV 2020; DreamtaleCore/Refool): reflections
blended into a share of the target class's training images, the trigger hidden as a reflection.

1. Candidates (scripts/insert_reflection.py): images of another data set (the paper's PascalVOC cannot be
   downloaded here: --trigger_path names the other data set, GTSRB's images for CIFAR-10 and CIFAR-10's for
   GTSRB) turned into reflection layers over a training image by one of the reference's two reflection models,
   in linear light, at the reference's working size (both images resized to 560 px first, as blend_images does):
   a ghost (two shifted copies; 39 of 101 draws, gen_main_func's ghost_rate) or out of focus (a Gaussian blur
   under a vignette); the layers then resized to the data set's size (as strategy.py's blend_image resizes the
   reflection before blending) and kept where the scene still dominates and its SSIM to the scene lies in a band.
2. The strategy (strategy.py): each candidate has a weight; each round poisons the training set with
   candidates drawn by weight, trains a proxy model, measures every candidate's success on triggered test
   images and sets its weight to it (the ones not drawn: the median).
3. The trigger (triggers.refool_trigger): the candidates and their final weights; each poisoned or test image
   gets one drawn by weight, blended as strategy.py's blend_image (triggers.reflect).

The chosen trigger is cached beside the data (decoding.cache_path). Numbers: config.REFOOL.
"""
import hashlib
import json
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import config
from batching import train_batches
from data_loader import RunData
from decoding import cache_path, data_fingerprint, load_dataset
from device import autocast, prepare_model
from errors import UserError
from files import atomic_save
from models import eval_mode, select_model
from poisoning import poison_train_set
from subsets import seeded, test_subset
from training import Steps, fit
from triggers import reflect, refool_trigger
from utils import step_lr

HYP = config.REFOOL
MODELS = ('ghost', 'blur')  # insert_reflection.py's two reflection models (the paper's third, same depth, is not in its code)


def gaussian_blur(img, sigma):
    """cv2.GaussianBlur(img, (k, k), sigma) with k = 2 ceil(2 sigma) + 1 on a float (H, W, C) image: a
    separable normalised Gaussian, the border reflected without repeating the edge (BORDER_REFLECT_101)."""
    k = int(2 * math.ceil(2 * sigma) + 1)
    taps = torch.arange(k, dtype=img.dtype) - (k - 1) / 2
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = img.shape[-1]
    x = img.permute(2, 0, 1)[None]
    x = F.pad(x, (k // 2, k // 2, k // 2, k // 2), mode='reflect')
    x = F.conv2d(x, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return x[0].permute(1, 2, 0)


def vignette(size, nsig=3):
    """insert_reflection.py's gen_kernel(size, nsig): the square root of the outer product of a normal
    density's mass over `size` equal bins of [-nsig - d/2, nsig + d/2], scaled to a maximum of 1."""
    interval = (2 * nsig + 1) / size
    edges = torch.linspace(-nsig - interval / 2, nsig + interval / 2, size + 1, dtype=torch.float64)
    mass = torch.diff(torch.special.ndtr(edges))
    kernel = torch.sqrt(torch.outer(mass, mass))
    return kernel / kernel.max()


def resized(img, size):
    """A float (H, W, C) image resized to (size, size) as cv2.resize's default (bilinear, pixel centres aligned,
    no antialiasing: blend_images passes INTER_CUBIC where cv2 reads the output array, so its default is used)."""
    x = img.permute(2, 0, 1)[None]
    return F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)[0].permute(1, 2, 0)


def reflection_images(t, r, model, p):
    """One of the reflection models on a scene t and a reflection r (float (H, W, 3) in [0,1], at the working size),
    with the draws p (alpha_t; sigma and att for 'blur'; offset and ghost_alpha for 'ghost'), as
    insert_reflection.py's blend_images computes them (the ghost layer brought to display light once, as the
    others: the reference does it twice, and its wrapping uint8 difference in keep() then let such bright layers
    pass): (blended, transmission, reflection) as uint8, truncated as the reference."""
    g, a = HYP['gamma'], p['alpha_t']
    t, r = t.double() ** g, r.double() ** g
    to8 = lambda v: (v * 255).to(torch.uint8)
    transmission = (t * a) ** (1 / g)
    if model == 'blur':
        r_blur = gaussian_blur(r, p['sigma'])
        blend = r_blur + t
        for c in range(3):  # the reflection's range brought down where the sum overflows
            over = blend[..., c] > 1
            mean = max(1.0, float((blend[..., c] * over).sum() / (over.sum() + 1e-6)))
            r_blur[..., c] = r_blur[..., c] - (mean - 1) * p['att']
        r_blur = r_blur.clamp(0, 1)
        mask = r_blur * vignette(t.shape[0])[:, :t.shape[1], None] * (1 - a / 2)
        reflection = (min(1.0, 4 * (1 - a)) * mask) ** (1 / g)
        blended = ((mask + t * a) ** (1 / g)).clamp(0, 1)
        return to8(blended), to8(transmission), to8(reflection)
    if model == 'ghost':
        (dy, dx), ga = p['offset'], p['ghost_alpha']
        h, w = r.shape[:2]
        r1 = F.pad(r.permute(2, 0, 1), (0, dx, 0, dy))
        r2 = F.pad(r.permute(2, 0, 1), (dx, 0, dy, 0))
        ghost = (r1 * ga + r2 * (1 - ga))[:, dy:-dy, dx:-dx]
        r = F.interpolate(ghost[None], size=(h, w), mode='bilinear', align_corners=False)[0].permute(1, 2, 0)
    mask = r * (1 - a)
    blended = ((mask + t * a) ** (1 / g)).clamp(0, 1)
    reflection = (mask ** (1 / g)).clamp(0, 1)  # once: the reference raises its ghost layer to 1/gamma twice
    return to8(blended), to8(transmission), to8(reflection)


def ssim(a, b):
    """skimage's compare_ssim(a, b, multichannel=True) on uint8 (H, W, 3) images: 7x7 uniform windows, sample
    covariances, data range 255, K1 0.01, K2 0.03, averaged over the windows inside the image and the channels."""
    x, y = (v.double().permute(2, 0, 1)[:, None] for v in (a, b))
    mean = lambda v: F.avg_pool2d(v, 7, stride=1)
    n = 49 / 48  # sample covariance
    ux, uy = mean(x), mean(y)
    vx, vy, vxy = n * (mean(x * x) - ux ** 2), n * (mean(y * y) - uy ** 2), n * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean().item()


def draw_model(g):
    """blend_images' choice: a ghost where random.randint(0, 100) < ghost_rate * 100, else the blur."""
    return 'ghost' if int(torch.randint(101, (), generator=g)) < round(100 * HYP['ghost_rate']) else 'blur'


def draw(model, g):
    """The random draws of one reflection model, from HYP's ranges."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()
    p = {'alpha_t': u(*HYP['alpha_t'])}
    if model == 'blur':
        p.update(sigma=u(*HYP['sigma']), att=1.08 + u(0, 0.1))
    if model == 'ghost':
        lo, hi = HYP['offset']
        p['offset'] = tuple(torch.randint(lo, hi + 1, (2,), generator=g).tolist())
        p['ghost_alpha'] = abs(float(torch.rand((), generator=g) > 0.5) - u(*HYP['ghost_alpha']))
    return p


def keep(blended, transmission, reflection):
    """insert_reflection.py's test of a candidate: the scene dominates (the reflection's mean below
    reflection_share times the rest's), the image is not black, and its SSIM to the scene lies in the band."""
    rest = (blended.double() - reflection.double()).mean()  # signed: the reference's uint8 difference wraps
    if reflection.double().mean() > HYP['reflection_share'] * rest or blended.max() < HYP['brightest'] * 255:
        return False
    lo, hi = HYP['ssim']
    return lo <= ssim(blended, transmission) <= hi


def candidates(sources, scenes, seed, n):
    """n reflection layers (uint8 (n, H, W, 3), at the scenes' size) and their models: source images (the other
    data set) over scenes (this data set's training images), both at HYP['scale'] px, each with a model drawn at
    random, the three layers then resized to the scenes' size, tried in a seeded order until n pass keep(). keep()
    judges them at the size the model sees: at 560 px an upscaled 32-px image is so smooth that its SSIM to the
    blend is 0.87-1.0 (1 in 60 CIFAR-10/GTSRB pairs passed the band), where the reference's photographs are not."""
    g = seeded(seed, 'refool-candidates')
    order = torch.randperm(len(sources), generator=g)
    out, kinds = [], []
    size, scale = scenes.shape[1], HYP['scale']
    for i in order.tolist():
        model = draw_model(g)
        scene = scenes[int(torch.randint(len(scenes), (), generator=g))]
        t, r = (resized(v.double() / 255, scale) for v in (scene, sources[i]))
        layers = [resized(v.double(), size).round().clamp(0, 255).to(torch.uint8)
                  for v in reflection_images(t, r, model, draw(model, g))]
        if keep(*layers):
            out.append(layers[2])
            kinds.append(model)
            if len(out) == n:
                break
    if len(out) < n:
        raise UserError(f'only {len(out)} of {len(sources)} reflection images made a Refool candidate, {n} needed')
    return torch.stack(out), kinds


def success_rates(model, x, target, trigger, normalizer, seed, amp, batch=256):
    """Each candidate's attack success on non-target images x, each blended with one candidate drawn by the
    trigger's weights: (successes, draws) per candidate."""
    k = len(trigger['weights'])
    pick = torch.multinomial(trigger['weights'], len(x), replacement=True, generator=seeded(seed, 'refool-score'))
    hits = torch.zeros(len(x), dtype=torch.bool)
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(x), batch):
            xb = reflect(x[i:i + batch].cpu(), trigger['pattern'][pick[i:i + batch]])
            with autocast(next(model.parameters()).device, amp):
                hits[i:i + batch] = (model(normalizer(xb.to(next(model.parameters()).device))).argmax(1) == target).cpu()
    return torch.bincount(pick[hits], minlength=k).double(), torch.bincount(pick, minlength=k).double()


def new_weights(successes, draws):
    """strategy.py's update: a drawn candidate's weight is its measured success (here as a rate, so that being
    drawn often is not itself a merit), the others the median of the drawn ones'."""
    drawn = draws > 0
    rates = torch.where(drawn, successes / draws.clamp_min(1), torch.zeros_like(draws))
    median = rates[drawn].median() if drawn.any() else torch.tensor(1.0, dtype=torch.float64)
    weights = torch.where(drawn, rates, median)
    return weights if weights.sum() > 0 else torch.ones_like(weights)  # nothing worked: start again, uniform


def _key(**parts):
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def reflection_trigger(args, device):
    """Refool's trigger for this data set, target and seed: read from the cache beside the data, else made
    (candidates, then the strategy's rounds of proxy models; their per-epoch logs under --log_root)."""
    source_root = args.trigger_path
    if not source_root or not os.path.isdir(os.path.join(source_root, 'train')):
        raise UserError("refoolTrigger needs --trigger_path <another data set's image folder> (<root>/train/<class>/*): "
                        'its images become the reflections (GTSRB for CIFAR-10, CIFAR-10 for GTSRB)')
    scenes = load_dataset(args.dataset, args.data_root, args.image_size, verbose=False)
    size = scenes['x_train'].shape[1]
    sources = load_dataset('ImageFolder', source_root, size, verbose=False)['x_train']
    key = _key(data=data_fingerprint(args.data_root), source=data_fingerprint(source_root), dataset=args.dataset,
               size=size, seed=args.seed, target=args.target_label, target_type=args.target_type, arch=args.arch,
               portion=args.inject_portion, normalize=args.normalize, amp=args.amp, hyp=HYP)
    path = cache_path(args.data_root, f'refool_{key}')
    if os.path.exists(path):
        print(f'Refool reflections read from {path}')
        return torch.load(path, weights_only=True)
    cands, kinds = candidates(sources, scenes['x_train'], args.seed, HYP['candidates'])
    print(f"Refool: {len(cands)} reflection candidates from {source_root} "
          f"({', '.join(f'{kinds.count(m)} {m}' for m in MODELS)})")
    weights = torch.ones(len(cands), dtype=torch.float64)
    data = RunData(args, device, verbose=False, trigger=refool_trigger(cands, weights))
    check = test_subset(data.test, HYP['proxy_test'], args.seed)
    x_check = check['x_clean'][check['nontarget']].cpu()
    for rnd in range(HYP['rounds']):
        trigger = refool_trigger(cands, weights)
        model = proxy_model(args, data, dict(data.attack, trigger=trigger), device, rnd)
        successes, draws = success_rates(model, x_check, data.attack['target_label'], trigger, data.normalizer,
                                         args.seed + rnd, args.amp)
        print(f'Refool round {rnd + 1}/{HYP["rounds"]}: proxy success {100 * successes.sum() / draws.sum():.2f}% '
              f'on {int(draws.sum())} triggered test images')
        weights = new_weights(successes, draws)
    trigger = refool_trigger(cands, weights)
    atomic_save(trigger, path)
    print(f'Refool reflections cached in {path}')
    return trigger


def proxy_model(args, data, attack, device, rnd):
    """A round's proxy: the zoo's recipe for HYP['proxy_epochs'] epochs on the training set poisoned with this
    round's trigger (its own seeded choice of images and reflections)."""
    recipe = config.BADNET_RECIPES[args.recipe]
    x, y, _ = poison_train_set(data.x_train, data.y_train, attack, data.num_classes, args.seed * 1000 + rnd)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(args.seed * 1000 + rnd)
    model = prepare_model(select_model(args.arch, data.num_classes), device)
    run = SimpleNamespace(**vars(args))
    run.epochs, run.resume = HYP['proxy_epochs'], False
    augment = recipe['augment'] and not args.no_augment and data.crop_flip
    batches = lambda e: train_batches(x, y, args.batch_size, data.normalizer, args.seed * 1000 + rnd, e,
                                      augment_data=augment)
    milestones = [round(f * run.epochs) for f in recipe['milestones']]
    loss = lambda xb, yb: F.cross_entropy(model(xb), yb)
    fit(run, model, Steps(batches, loss), lambda e: step_lr(args.lr, e, milestones, recipe['factors']), data.test,
        data.normalizer, out_path=None, csv_path=os.path.join(args.log_root, f'refool_proxy_{rnd + 1}.csv'), meta={},
        nesterov=recipe['nesterov'], tag=f'refool proxy {rnd + 1}')
    return model
