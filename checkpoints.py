"""Checkpoints: the field's layout ({'state_dict', 'epoch', ...} plus this project's `meta`), read with
torch.load(weights_only=True) and clear errors, written atomically, everything on the CPU."""
import pickle
import os
import warnings

import torch

from device import prepare_model, setup, unwrap
from errors import UserError
from files import atomic_save
from models import MODELS, select_model


def resolve(args, name, meta_value):
    """A flag given on the command line, else what the checkpoint's meta says, else config.py's value."""
    if name in getattr(args, 'given', ()) or meta_value is None:
        return getattr(args, name)
    return meta_value


def load_checkpoint(path, map_location='cpu'):
    """torch.load with weights_only=True (checkpoints are untrusted input) and clear errors."""
    if not path or not os.path.exists(path):
        raise UserError(f'checkpoint not found: {path}')
    if os.path.isdir(path):
        raise UserError(f'expected a checkpoint file, got a directory: {path}')
    if os.path.getsize(path) == 0:
        raise UserError(f'checkpoint is empty: {path}')
    try:
        with warnings.catch_warnings():  # e.g. 'Detected pickle protocol 4': the error below says it all
            warnings.simplefilter('ignore')
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'global' in str(e).lower():  # the weights-only unpickler met a class or function reference
            raise UserError(f'refused to load {path}: it holds Python objects beyond tensors and plain containers '
                            '(a pickle that could run code)')
        raise UserError(f'not a readable checkpoint (truncated or corrupt): {path}')
    except Exception:
        raise UserError(f'not a readable checkpoint (truncated or corrupt): {path}')
    if not isinstance(obj, dict):
        raise UserError(f'not a checkpoint (expected a dict with a state_dict): {path}')
    return obj


def state_dict_of(ckpt, path):
    sd = ckpt.get('state_dict', ckpt)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f'no state_dict of tensors in checkpoint: {path}')
    return {k[7:] if k.startswith('module.') else k: v for k, v in sd.items()}


def load_given_model(args, script):
    """The --model a script is pointed at (required): device set up, model and meta loaded; with
    --attack_from, the meta's attack is that checkpoint's."""
    if not args.model:
        raise UserError(f'{script} needs --model PATH')
    device = setup(args)
    model, meta = load_model(args.model, args, None, device)
    if getattr(args, 'attack_from', None):  # e.g. the clean control scored under a backdoored model's trigger
        attack = (load_checkpoint(args.attack_from).get('meta') or {}).get('attack')
        if not isinstance(attack, dict) or 'trigger' not in attack:
            raise UserError(f'--attack_from {args.attack_from}: its meta holds no attack')
        meta = dict(meta, attack=attack)
        print(f"scoring against the attack of {args.attack_from}: {attack.get('trigger_type')} "
              f"{attack.get('target_type')} target {attack.get('target_label')}")
    return device, model, meta


def load_model(path, args, num_classes_hint, device):
    """Build the checkpoint's model (arch/classes from its meta, else flags) and load its weights.
    Returns (model, meta)."""
    ckpt = load_checkpoint(path, map_location=device)
    meta = ckpt.get('meta') if isinstance(ckpt.get('meta'), dict) else {}
    sd = state_dict_of(ckpt, path)
    arch = resolve(args, 'arch', meta.get('arch'))
    if arch not in MODELS:
        raise UserError(f"{path}: unknown model '{arch}' in meta")
    num_classes = resolve(args, 'num_class', meta.get('num_classes')) or num_classes_hint
    if num_classes is None:  # an image folder not read yet: infer from the classifier
        num_classes = next((v.shape[0] for k, v in sd.items() if k in ('fc.weight', 'linear.weight')), 10)
    model = select_model(arch, num_classes)
    load_weights(model, sd, path, f'{arch} with {num_classes} classes')
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f'{path}: weights contain NaN or inf ({k})')
    meta = dict(meta, arch=arch, num_classes=num_classes)
    return prepare_model(model, device, args), meta


def load_weights(model, sd, path, what):
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}' for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', shapes)):
            if keys:
                parts.append(f"{name} {len(keys)}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        raise UserError(f'{path} does not fit {what} ({"; ".join(parts)}); set --arch/--num_class')
    model.load_state_dict(sd, strict=False)


def save_checkpoint(path, model, meta, epoch, metrics):
    """The field's checkpoint layout plus `meta`; final values, never 'best by test ASR'. Everything in
    it is on the CPU (meta too: triggers, WaNet grids, MCL's pattern), so it loads on any machine."""
    atomic_save(on_cpu({'state_dict': unwrap(model).state_dict(), 'epoch': epoch, 'best_clean_acc': metrics.get('ACC'),
                        'best_bad_acc': metrics.get('ASR'), 'metrics': metrics, 'meta': meta}), path)


def on_cpu(obj):
    """A copy of nested dicts/lists/tuples with every tensor detached and on the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def plain_args(args):
    """The options with plain values, as stored in a checkpoint's meta (weights_only-loadable)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def make_meta(args, arch, num_classes, image_size, normalizer, attack, script):
    attack = dict(attack)
    attack['trigger'] = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in attack['trigger'].items()}
    return {'arch': arch, 'num_classes': num_classes, 'dataset': args.dataset, 'image_size': image_size,
            'normalize': list(normalizer.values), 'attack': attack, 'script': script, 'args': plain_args(args)}
