"""The defenses, one module each (as models/ holds the models), registered in config.DEFENSES, and what
every defense run shares: the start (device, the model under defense, the data, the defender's clean
subset), the defender-side check at the end, and the summary.

A defense module exposes build(args, run, ...) -> training.Steps: what a batch is, the loss, and where
needed a gradient point and an after-step hook; the one training loop (training.fit) drives it.
"""
import importlib
import os
import time
from types import SimpleNamespace

import config
from checkpoints import load_model, plain_args
from data_loader import RunData, train_batches
from device import setup
from metrics import accuracy, summary_line


def module(key):
    """The module in defenses/ that implements the registered defense `key`."""
    return importlib.import_module(f"defenses.{config.DEFENSES[key]['module']}")


def clean_batches(args, run, recipe, normalizer=None, images=None):
    """One epoch's batches of the defender's clean subset as a recipe (a config.DEFENSES entry) has them:
    its augmentation (crop + flip where the data set has them, Cutout), no ragged last batch where it says
    so. normalizer: the model's (default), or another (raw [0,1] where images change before normalising).
    Cutout is --cutout where the script has it (FT, NAD, ARGD), else the recipe's. images: (x, y), a part
    of the subset (default: all of it)."""
    cutout = getattr(args, 'cutout', recipe['cutout'])
    x, y = images or (run.x, run.y)
    return lambda epoch: train_batches(x, y, args.batch_size, normalizer or run.data.normalizer, args.seed,
                                       epoch, augment_data=recipe['augment'], drop_last=recipe['drop_last'],
                                       cutout=cutout, crop_flip=run.data.crop_flip)


def defense_setup(args):
    """Everything a defense starts from: device, the model under defense (--s_model) and its
    meta, the data with the attack for evaluation, and the defender's clean subset."""
    started = time.time()
    device = setup(args)
    s_path = args.s_model or os.path.join(args.checkpoint_root, 's_net', f'{args.arch}.tar')
    model, meta = load_model(s_path, args, None, device)
    data = RunData(args, device, meta)
    x, y = data.clean_subset(args.ratio, args.seed, device)
    s_name = os.path.splitext(os.path.basename(s_path))[0]
    print(f"{s_path}: {meta['arch']}, attack {data.attack['trigger_type']} {data.attack['target_type']} "
          f"target {data.attack['target_label']} (for evaluation only); {len(y)} clean images ({args.ratio:g} of train)")
    before = accuracy(model, x, y, data.normalizer, args.eval_batch_size, args.amp)
    return SimpleNamespace(device=device, model=model, meta=meta, data=data, x=x, y=y, s_path=s_path, s_name=s_name,
                           subset_before=before, started=started)


def defender_check(run, model, args, metrics):
    """Add the clean-subset accuracy before and after the defense to metrics, and warn (stdout and
    metrics['warning']) when it fell by more than config.COLLAPSE_POINTS: the defender sees the
    collapse without looking at the test set."""
    after = accuracy(model, run.x, run.y, run.data.normalizer, args.eval_batch_size, args.amp)
    metrics.update(subset_before=run.subset_before, subset_after=after, warning=None)
    print(f"defender's clean subset: accuracy {run.subset_before:.2f} before, {after:.2f} after")
    if after < run.subset_before - config.COLLAPSE_POINTS:
        metrics['warning'] = (f"the defense cut accuracy on the defender's clean subset from {run.subset_before:.2f} "
                              f'to {after:.2f}: the model is damaged')
        print(f"warning: {metrics['warning']}", flush=True)
    return metrics


def defense_meta(meta, args, defense):
    return dict(meta, defense=defense, defense_args=plain_args(args))


def finish(run, model, args, metrics, saved, *more):
    """Every defense script's last lines: the defender's check, where the files went, the summary."""
    defender_check(run, model, args, metrics)
    print(f"saved {saved} ({time.time() - run.started:.0f}s); log {'; '.join(more)}")
    print(summary_line(metrics, args.json))
