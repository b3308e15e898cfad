"""The one training loop: every script's epochs, its per-epoch line and CSV, and exact resume."""
import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from checkpoints import load_checkpoint, on_cpu, save_checkpoint
from device import autocast, unwrap
from errors import UserError
from files import atomic_save, write_csv
from metrics import METRICS, evaluate
from subsets import test_subset

# options that do not change a run's result: a resumed run may differ in these only
NOT_RESULT = ('device', 'threads', 'cuda_graphs', 'output', 'log_root', 'checkpoint_root', 'resume', 'eval_every',
              'eval_subset', 'eval_batch_size', 'json', 'given', 'rank')


@dataclass
class Steps:
    """What the loop runs each epoch: every training script and every defense (defenses/) fills in one."""
    batches: Callable                        # epoch (0-based) -> iterable of (x, y) on the device
    loss: Callable                           # (x, y) -> scalar loss
    gradient_point: Optional[Callable] = None  # () -> a context the forward and backward run in (PAM)
    after_step: Optional[Callable] = None    # runs after every optimiser step (FST: the head's norm put back)
    train_mode: bool = True                  # False: the model steps in eval mode (SAU: BatchNorm frozen)
    extra_modules: dict = field(default_factory=dict)  # trained beside the model where they need gradients; resumed
    #                                          (any state_dict holder: BTI-DBF's generator's own optimiser too)
    meta: dict = field(default_factory=dict)  # what the run adds to the checkpoint's meta and the summary
    epochs: Optional[int] = None             # the defense's own count where it decides one (NC: 0, nothing flagged)
    lr_at: Optional[Callable] = None         # epoch -> lr where the defense sets its own (FT: --teacher_lr's schedule)
    finish: Optional[Callable] = None        # after the last epoch: puts the defended weights in the model before
    #                                          it is scored and saved (MCR: its curve's point); no per-epoch scores


def fit(args, model, steps, lr_at, test, normalizer, *, out_path, csv_path, meta, epochs=None, nesterov=False,
        evaluate_first=False, tag='train', optimizer='sgd', first_epoch=0):
    """The training loop of every script; ends by saving the final model to out_path (None: the
    model is only returned in place, with no resume state and no file).

    steps: what each epoch runs (Steps); lr_at(epoch) -> learning rate of that epoch (0-based). optimizer:
    'sgd' (momentum, weight decay, nesterov from the arguments) or 'adam'. Each epoch ends with an atomic
    resume state, so --resume after a crash repeats the uninterrupted run exactly (or refuses, if any
    option that changes the result differs). first_epoch: where a model continued from its final epoch
    (train_badnet.py --continue_from) starts. Returns the final model's metrics.
    """
    epochs = steps.epochs if steps.epochs is not None else args.epochs if epochs is None else epochs
    lead = getattr(args, 'rank', 0) == 0  # under torchrun only rank 0 writes files
    extra_modules = dict(steps.extra_modules)
    params = list(model.parameters()) + [p for m in extra_modules.values() if isinstance(m, torch.nn.Module)
                                         for p in m.parameters() if p.requires_grad]
    if optimizer == 'adam':
        optimizer = torch.optim.Adam(params, lr=lr_at(0), weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=lr_at(0), momentum=args.momentum, weight_decay=args.weight_decay,
                                    nesterov=nesterov and args.momentum > 0)  # without momentum Nesterov is plain SGD
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=args.amp == 'fp16')
    extra_modules = dict(extra_modules, **({'grad_scaler': scaler} if scaler.is_enabled() else {}))
    state_path = out_path + '.resume' if out_path else None
    run_id = dict(result_options(args), tag=tag, epochs=epochs, lr=[lr_at(e) for e in range(epochs)])
    rows = load_resume_state(args, state_path, run_id, model, optimizer, extra_modules, tag)
    # per-epoch rows watch a fixed subset; the final model is scored on the full test sets
    monitor = test_subset(test, args.eval_subset, args.seed) if args.eval_subset else test
    score = lambda t: evaluate(model, t, normalizer, args.eval_batch_size, args.amp)
    final = None
    if not rows and evaluate_first and not steps.finish:
        rows.append(dict(epoch=0, lr=0.0, loss=float('nan'), **csv_metrics(score(monitor), monitor), seconds=0.0))
        print(log_line(rows[-1], epochs, tag))
    for epoch in range(rows[-1]['epoch'] if rows else first_epoch, epochs):
        t0 = time.time()
        loss = train_epoch(model, optimizer, steps.loss, steps.batches(epoch), lr_at(epoch), args.amp,
                           steps.gradient_point, steps.after_step, scaler, steps.train_mode)
        if not all_ranks_finite(loss, args):  # one rank's NaN stops every rank, none waits for it
            raise UserError(f'{tag}: loss became NaN/inf in epoch {epoch + 1}; stopped, the last good state is '
                            f'{state_path if state_path and os.path.exists(state_path) else "the input model"}')
        row = dict(epoch=epoch + 1, lr=lr_at(epoch), loss=round(loss, 5))
        if epoch + 1 == epochs:
            if steps.finish:
                steps.finish()
            final = score(test)
            row.update(csv_metrics(final, test))
        elif (epoch + 1) % args.eval_every == 0 and not steps.finish:
            row.update(csv_metrics(score(monitor), monitor))
        row['seconds'] = round(time.time() - t0, 2)
        rows.append(row)
        print(log_line(row, epochs, tag), flush=True)
        if lead:
            write_csv(rows, csv_path)
        if lead and state_path:
            atomic_save(on_cpu({'model': unwrap(model).state_dict(), 'optimizer': optimizer.state_dict(),
                                'extra': {n: m.state_dict() for n, m in extra_modules.items()},
                                'rng': torch.get_rng_state(), 'rows': rows, 'run_id': run_id}), state_path)
    if lead and rows:
        write_csv(rows, csv_path)
    final = final or score(test)
    if lead and out_path:
        save_checkpoint(out_path, model, dict(meta, **steps.meta), epochs, final)  # with what finish() added
        if os.path.exists(state_path):  # only once the final model is safely written
            os.unlink(state_path)
    return final


def train_epoch(model, optimizer, loss_fn, batches, lr, amp, gradient_point=None, after_step=None, scaler=None,
                train_mode=True):
    """One pass of optimiser steps; returns the mean loss (NaN if any step's loss was not finite).
    scaler: fp16's GradScaler (the loss scaled for backward, the step unscaled and skipped on overflow)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    model.train(train_mode)
    device = next(model.parameters()).device
    total, finite, steps = torch.zeros((), device=device), torch.ones((), dtype=torch.bool, device=device), 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with gradient_point() if gradient_point else contextlib.nullcontext():
            with autocast(device, amp):
                loss = loss_fn(x, y)
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if after_step:
            after_step()
        finite &= torch.isfinite(loss.detach())  # no host sync per step
        total += loss.detach().float()
        steps += 1
    return total.item() / max(steps, 1) if finite.item() else float('nan')


def result_options(args):
    """Every option that changes a run's result, as plain values (what a resume must match)."""
    plain = (int, float, str, bool, type(None))
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(vars(args).items())
            if k not in NOT_RESULT and (isinstance(v, plain) or isinstance(v, (list, tuple)))}


def load_resume_state(args, state_path, run_id, model, optimizer, extra_modules, tag):
    """With --resume and a state file: check it was written by this run's options, load it, and
    return its CSV rows; else []."""
    if not getattr(args, 'resume', False) or not state_path:
        return []
    if not os.path.exists(state_path):
        print(f'no resume state at {state_path}: starting {tag} from scratch')
        return []
    # onto the CPU: the RNG state must stay a CPU ByteTensor; load_state_dict copies the rest to the model's device
    state = load_checkpoint(state_path, map_location='cpu')
    old = state.get('run_id') or {}
    for key in sorted(set(old) | set(run_id)):
        if old.get(key, '(unset)') != run_id.get(key, '(unset)'):
            name = f'--{key}' if key not in ('tag', 'lr', 'amp') else key
            raise UserError(f'{state_path} was written with {name} {old.get(key, "(unset)")}, this run has '
                            f'{run_id.get(key, "(unset)")}: delete it or rerun without --resume')
    unwrap(model).load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    for name, m in extra_modules.items():
        m.load_state_dict(state['extra'][name])
    torch.set_rng_state(state['rng'])
    print(f"resuming {tag} after epoch {state['rows'][-1]['epoch']} ({state_path})")
    return state['rows']


def csv_metrics(metrics, test):
    """The per-epoch CSV columns of an evaluation (no per-class list), with how many images it scored."""
    return dict({k: metrics[k] for k in METRICS}, eval_images=len(test['y_clean']))


def log_line(row, epochs, tag):
    parts = [f"{tag} epoch {row['epoch']:3d}/{epochs}", f"lr {row['lr']:.4f}"]
    if not math.isnan(row['loss']):
        parts.append(f"loss {row['loss']:.4f}")
    parts += [f'{k} {row[k]:6.2f}' for k in ('ACC', 'ACC_target', 'ASR', 'RA') if k in row]
    if 'eval_images' in row:
        parts.append(f"({row['eval_images']} test imgs)")
    parts.append(f"{row['seconds']:.1f}s")
    return '  '.join(parts)


def all_ranks_finite(loss, args):
    """Whether the epoch's loss was finite on every rank (one all-reduce per epoch under torchrun)."""
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0])
    if getattr(args, 'world_size', 1) > 1:
        backend = torch.distributed.get_backend()
        bad = bad.cuda() if backend == 'nccl' else bad
        torch.distributed.all_reduce(bad)
    return float(bad.sum()) == 0
