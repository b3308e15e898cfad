"""The defenses, one module each (as models/ holds the models), and what every defense run shares: the
registry, the start (device, the model under defense, the data, the defender's clean subset), the
defender-side check at the end, and the summary. defenses/driver.py runs any of them.

A defense module declares, in itself:
  KEYS      {key: dict(label=..., told=None or the flag that tells it the row's target, needs=(...))}: the
            registered defenses it implements (each needs an entry of numbers in config.DEFENSES); needs
            names what the run must be given: 'teacher' (FT's model, made first if absent), or makes itself:
            'end' (FT's recipe on part of the subset, MCR's curve end; the table keys it with FT's numbers);
            filter=True: a run-time input filter that leaves the model as it is (STRIP), not a column of the
            erasers' table
  FINDINGS  what the table records of its summary (flagged classes, chosen t, ...)
  options(add)   its command-line options: option groups (options.py) and its own, each declared once
  check(args)    (optional) its own checks of those options, before any work starts
  build(ctx) -> training.Steps, or None where it ends the run itself (MCL with no target)
  tag(args), meta_name(args), output(args, s_name)   (optional) its file names; default: the key
"""
import functools
import importlib
import os
import pkgutil
import time
from types import SimpleNamespace

import config
from batching import train_batches
from checkpoints import load_model, plain_args
from data_loader import RunData
from device import setup
from errors import UserError
from metrics import accuracy, summary_line


@functools.lru_cache(maxsize=None)
def registry():
    """{key: spec} of every defense module's KEYS, in config.DEFENSES's order (the table's columns). A spec:
    key, module, label, told (the flag that tells it the target, or None: blind), needs, filter, findings."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f'{__name__}.{info.name}')
        for key, spec in getattr(module, 'KEYS', {}).items():
            if key in found:
                raise AssertionError(f'defense {key} is declared by {found[key].module.__name__} and {module.__name__}')
            found[key] = SimpleNamespace(key=key, module=module, label=spec['label'], told=spec.get('told'),
                                         needs=tuple(spec.get('needs', ())), filter=spec.get('filter', False),
                                         findings=tuple(getattr(module, 'FINDINGS', ())))
    missing, unnumbered = set(config.DEFENSES) - set(found), set(found) - set(config.DEFENSES)
    if missing or unnumbered:
        raise AssertionError(f'config.DEFENSES keys without a module in defenses/: {sorted(missing)}; '
                             f'defenses without their numbers in config.DEFENSES: {sorted(unnumbered)}')
    return {key: found[key] for key in config.DEFENSES}


def module(key):
    """The module in defenses/ that implements the registered defense `key`."""
    return registry()[key].module


def tag_of(key, args):
    """A run's name in its files and logs (the key, or the module's own: ft-si for ft-at with a synthesised
    trigger, teacher for FT)."""
    return getattr(module(key), 'tag', lambda a: key)(args)


def clean_batches(args, run, normalizer=None, images=None, recipe=None):
    """One epoch's batches of the defender's clean subset as the recipe (default: the run's options) has them:
    its augmentation (crop + flip where the data set has them, Cutout), no ragged last batch where it says
    so. normalizer: the model's (default), or another (raw [0,1] where images change before normalising).
    images: (x, y), a part of the subset (default: all of it)."""
    recipe = recipe or args
    x, y = images or (run.x, run.y)
    return lambda epoch: train_batches(x, y, args.batch_size, normalizer or run.data.normalizer, args.seed,
                                       epoch, augment_data=recipe.augment, drop_last=recipe.drop_last,
                                       cutout=recipe.cutout, crop_flip=run.data.crop_flip)


def defense_setup(args):
    """Everything a defense starts from: device, the model under defense (--s_model) and its
    meta, the data with the attack for evaluation, and the defender's clean subset."""
    started = time.time()
    device = setup(args)
    root = getattr(args, 'checkpoint_root', config.TRAINING['checkpoint_root'])  # main_strip.py writes nothing there
    s_path = args.s_model or os.path.join(root, 's_net', f'{args.arch}.tar')
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
    """Every defense run's last lines: the defender's check, where the files went, the summary."""
    defender_check(run, model, args, metrics)
    print(f"saved {saved} ({time.time() - run.started:.0f}s); log {'; '.join(more)}")
    print(summary_line(metrics, args.json))


def unknown(key):
    return UserError(f"unknown defense '{key}' (choose from {', '.join(registry())})")
