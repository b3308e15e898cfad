"""Shared machinery: device and seeds, checkpoints, the one evaluation function, and the one
training loop every script uses."""
import contextlib
import ctypes
import importlib.util
import json
import math
import os
import pickle
import shutil
import sys
import sysconfig
import time
import warnings
from types import SimpleNamespace

import torch

import config
from cli import UserError, resolve
from data_loader import RunData, test_subset
from files import atomic_save, write_csv
from models import MODELS, select_model

METRICS = ('ACC', 'ACC_all', 'ACC_target', 'ASR', 'RA')  # the summary line, in this order
# options that do not change a run's result: a resumed run may differ in these only
NOT_RESULT = ('device', 'threads', 'output', 'log_root', 'checkpoint_root', 'resume', 'eval_every', 'eval_subset',
              'eval_batch_size', 'json', 'given', 'rank')


# ----------------------------------------------------------------------------- setup
def setup(args, distributed=False):
    """Pick the device, threads and global seed; returns the torch.device. Under torchrun
    (distributed scripts only) join the process group: NCCL with a GPU per process, gloo on
    CPU; ranks other than 0 go quiet, rank 0 speaks for the run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    args.rank, args.world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if args.world_size > 1 and not distributed:
        raise UserError('only train_badnet.py runs under torchrun; start this script as a single process')
    name = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda asked for, but no CUDA device is available')
    if args.world_size > 1:
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        if args.rank > 0:
            sys.stdout = open(os.devnull, 'w')
    torch.manual_seed(args.seed)
    if getattr(args, 'deterministic', False):
        make_deterministic()
    args.amp, why = pick_precision(args.precision, device)
    print(f'device {device}, precision {why}', flush=True)
    args.eval_batch_size = args.eval_batch_size or config.EVAL_BATCH_SIZE.get(device.type, config.EVAL_BATCH_SIZE['cpu'])
    return device


def keep_freed_memory():
    """glibc hands freed blocks above a moving threshold back to the OS, and the next batch faults
    them in again page by page: evaluation ran 1.5x faster here with blocks up to 32 MB served from
    the heap and up to 256 MB of free heap kept (results/README.md). A no-op off glibc."""
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest allowed value
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):  # musl or another libc: leave its allocator alone
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def make_deterministic():
    """--deterministic: cuDNN's deterministic kernels and torch's deterministic algorithms (CUDA
    results then repeat run to run on one GPU, slower); the CPU kernels used here are deterministic
    already. cuBLAS needs its workspace fixed before the first call."""
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True)


def pick_precision(precision, device):
    """-> (amp, reason for the log): amp is 'bf16', 'fp16' (autocast with a GradScaler) or False (fp32).
    auto picks what the device computes natively: bf16 on GPUs of compute capability 8.0 or newer and on
    CPUs with AMX/AVX512-BF16, fp16 on older GPUs with tensor cores (7.x: V100, T4, where bf16 is only
    emulated), else fp32."""
    if precision == 'fp16' and device.type != 'cuda':
        raise UserError('--precision fp16 is for CUDA GPUs; use bf16 or fp32 on the CPU')
    native = native_precision(device)
    if precision == 'auto':
        if native is None:
            return False, f'fp32 ({device} computes neither bf16 nor fp16 natively)'
        return native[0], f'{native[0]} autocast ({native[1]})'
    if precision == 'fp32':
        return False, 'fp32 (asked for)'
    return precision, f'{precision} autocast (asked for)'


def native_precision(device):
    """(the low precision the device computes natively, why) or None: CUDA GPUs by their compute
    capability (bf16 from 8.0, fp16 tensor cores from 7.0), CPUs whose flags list AMX-BF16 or
    AVX512-BF16 (read from /proc/cpuinfo, not assumed)."""
    if device.type == 'cuda':
        major, minor = torch.cuda.get_device_capability(device)
        name = f'{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}'
        return ('bf16', name) if major >= 8 else ('fp16', name) if major >= 7 else None
    if device.type != 'cpu':
        return None
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return None
    found = [f for f in ('amx_bf16', 'avx512_bf16') if f in flags]
    return ('bf16', f"CPU with {' and '.join(found)}") if found else None


def autocast(device, amp):
    """amp: 'bf16', 'fp16' or False (fp32; True is bf16, for callers that only switch it on)."""
    return torch.autocast(device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16, enabled=bool(amp))


def prepare_model(model, device):
    """Move to the device in channels_last layout: batches arrive as NHWC memory, and it
    measured faster on CPU too (see README, Performance)."""
    return model.to(device=device, memory_format=torch.channels_last)


def compiled(model, args, device):
    """torch.compile the model where asked (on) or where its toolchain is found (auto): it costs a
    one-off compile (~15 s here) and pays it back within the first epochs of a backdoor training."""
    missing = compile_toolchain_missing(device)
    if args.compile == 'on' and missing:
        raise UserError(f'--compile on needs {missing}; use --compile off')
    use = args.compile == 'on' or (args.compile == 'auto' and not missing)
    print(f"torch.compile {'on' if use else 'off'}" + (f' ({missing} not found)' if args.compile == 'auto' and missing else
                                                          f' (--compile {args.compile})'), flush=True)
    return torch.compile(model) if use else model


def compile_toolchain_missing(device):
    """What torch.compile's default backend (Inductor) lacks here at run time, or None: it builds C++
    on the CPU and triton kernels (compiled by a C compiler against Python's headers) on CUDA."""
    if device.type == 'cuda':
        if not importlib.util.find_spec('triton'):
            return 'triton'
        if not any(shutil.which(c) for c in ('cc', 'gcc', 'clang')):
            return 'a C compiler (triton builds its launcher with one)'
    elif not any(shutil.which(c) for c in ('c++', 'g++', 'clang++')):
        return 'a C++ compiler'
    include = sysconfig.get_paths().get('include') or ''
    if not os.path.exists(os.path.join(include, 'Python.h')):
        return "Python's C headers (python3-dev)"
    return None


def data_parallel(model, device, args):
    """The model wrapped for DistributedDataParallel under torchrun, else the model itself."""
    if args.world_size == 1:
        return model
    # each rank sees 1/world of the global batch: BatchNorm's statistics over all of it, as one process has them
    # (SyncBatchNorm runs on GPUs only; gloo ranks on CPUs keep per-rank statistics)
    if device.type == 'cuda':
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(unwrap(model))  # in place: the BN layers are replaced
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)


def end_distributed(args):
    """Every rank waits for rank 0's files, then leaves the process group."""
    if getattr(args, 'world_size', 1) > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- checkpoints
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
    return prepare_model(model, device), meta


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


def all_ranks_finite(loss, args):
    """Whether the epoch's loss was finite on every rank (one all-reduce per epoch under torchrun)."""
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0])
    if getattr(args, 'world_size', 1) > 1:
        backend = torch.distributed.get_backend()
        bad = bad.cuda() if backend == 'nccl' else bad
        torch.distributed.all_reduce(bad)
    return float(bad.sum()) == 0


def conv_norm(model):
    """The L2 norm of all conv weights together: under BatchNorm a step of lr acts like lr / |w|^2, so
    this says how hard a defense's lr hits the model (published WRN-16-1 checkpoints: 46-72)."""
    return float(torch.sqrt(sum(p.detach().float().pow(2).sum() for p in model.parameters() if p.dim() == 4)))


def unwrap(model):
    return getattr(model, '_orig_mod', model)


def plain_args(args):
    """The options with plain values, as stored in a checkpoint's meta (weights_only-loadable)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def make_meta(args, arch, num_classes, image_size, normalizer, attack, script):
    attack = dict(attack)
    attack['trigger'] = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in attack['trigger'].items()}
    return {'arch': arch, 'num_classes': num_classes, 'dataset': args.dataset, 'image_size': image_size,
            'normalize': list(normalizer.values), 'attack': attack, 'script': script, 'args': plain_args(args)}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, x, normalizer, batch_size, amp=False):
    preds = []
    for i in range(0, len(x), batch_size):
        with autocast(x.device, amp):
            preds.append(model(normalizer(x[i:i + batch_size])).argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)


def evaluate(model, test, normalizer, batch_size=1000, amp=False):
    """In percent: ACC on the non-target test images (the papers' number), ACC_all on all of them,
    ACC_target on the target class's (which ACC leaves out), ASR, RA, and per_class accuracy."""
    was_training = model.training
    model.eval()
    y = test['y_clean']
    ok = predict(model, test['x_clean'], normalizer, batch_size, amp) == y
    p_bd = predict(model, test['x_bd'], normalizer, batch_size, amp)
    model.train(was_training)
    pct = lambda t: round(100.0 * t.float().mean().item(), 2) if t.numel() else 0.0
    return {'ACC': pct(ok[test['nontarget']]), 'ACC_all': pct(ok), 'ACC_target': pct(ok[y == test['target']]),
            'ASR': pct(p_bd == test['y_bd']), 'RA': pct(p_bd == test['y_bd_true']),
            'per_class': [pct(ok[y == c]) for c in range(test['num_classes'])]}


def summary_line(metrics, as_json=False):
    if as_json:
        return json.dumps({k: v for k, v in metrics.items()})
    return ' '.join(f'{k} {metrics[k]:.2f}' for k in METRICS)


# ----------------------------------------------------------------------------- training
def fit(args, model, loss_fn, batches, lr_at, test, normalizer, *, out_path, csv_path, meta, epochs=None,
        params=None, extra_modules=None, nesterov=False, evaluate_first=False, tag='train', optimizer='sgd',
        gradient_point=None, after_step=None):
    """The training loop of every script; ends by saving the final model to out_path (None: the
    model is only returned in place, with no resume state and no file).

    loss_fn(x, y) -> scalar loss; batches(epoch) -> iterable of (x, y) on the device;
    lr_at(epoch) -> learning rate of that epoch (0-based). optimizer: 'sgd' (momentum, weight decay,
    nesterov from the arguments) or 'adam'. gradient_point() -> a context manager the forward and
    backward pass run in (PAM: the gradient taken at another point than the weights it updates);
    after_step() runs after every optimiser step (FST: the head's norm put back). Each epoch ends with an
    atomic resume state, so --resume after a crash repeats the uninterrupted run exactly (or refuses,
    if any option that changes the result differs). Returns the final model's metrics.
    """
    epochs = args.epochs if epochs is None else epochs
    lead = getattr(args, 'rank', 0) == 0  # under torchrun only rank 0 writes files
    extra_modules = extra_modules or {}
    params = list(params if params is not None else model.parameters())
    if optimizer == 'adam':
        optimizer = torch.optim.Adam(params, lr=lr_at(0), weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=lr_at(0), momentum=args.momentum, weight_decay=args.weight_decay,
                                    nesterov=nesterov)
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
    if not rows and evaluate_first:
        rows.append(dict(epoch=0, lr=0.0, loss=float('nan'), **csv_metrics(score(monitor), monitor), seconds=0.0))
        print(log_line(rows[-1], epochs, tag))
    for epoch in range(rows[-1]['epoch'] if rows else 0, epochs):
        t0 = time.time()
        loss = train_epoch(model, optimizer, loss_fn, batches(epoch), lr_at(epoch), args.amp, gradient_point, after_step,
                           scaler)
        if not all_ranks_finite(loss, args):  # one rank's NaN stops every rank, none waits for it
            raise UserError(f'{tag}: loss became NaN/inf in epoch {epoch + 1}; stopped, the last good state is '
                            f'{state_path if state_path and os.path.exists(state_path) else "the input model"}')
        row = dict(epoch=epoch + 1, lr=lr_at(epoch), loss=round(loss, 5))
        if epoch + 1 == epochs:
            final = score(test)
            row.update(csv_metrics(final, test))
        elif (epoch + 1) % args.eval_every == 0:
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
        save_checkpoint(out_path, model, meta, epochs, final)
        if os.path.exists(state_path):  # only once the final model is safely written
            os.unlink(state_path)
    return final


def train_epoch(model, optimizer, loss_fn, batches, lr, amp, gradient_point=None, after_step=None, scaler=None):
    """One pass of optimiser steps; returns the mean loss (NaN if any step's loss was not finite).
    scaler: fp16's GradScaler (the loss scaled for backward, the step unscaled and skipped on overflow)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    model.train()
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


def step_lr(base, epoch, milestones, factors):
    """Step schedule: base * factors[i], where i = how many milestones epoch (0-based) has reached."""
    return base * factors[sum(epoch >= m for m in milestones)]


def cosine_lr(base, epoch, epochs):
    """CosineAnnealingLR stepped once per epoch: base at epoch 0, towards 0 at the end."""
    return base * (1 + math.cos(math.pi * epoch / epochs)) / 2


def log_line(row, epochs, tag):
    parts = [f"{tag} epoch {row['epoch']:3d}/{epochs}", f"lr {row['lr']:.4f}"]
    if not math.isnan(row['loss']):
        parts.append(f"loss {row['loss']:.4f}")
    parts += [f'{k} {row[k]:6.2f}' for k in ('ACC', 'ACC_target', 'ASR', 'RA') if k in row]
    if 'eval_images' in row:
        parts.append(f"({row['eval_images']} test imgs)")
    parts.append(f"{row['seconds']:.1f}s")
    return '  '.join(parts)


def defense_setup(args):
    """Everything a defense starts from: device, the model under defense (--s_model) and its
    meta, the data with the attack for evaluation, and the defender's clean subset."""
    device = setup(args)
    s_path = args.s_model or os.path.join(args.checkpoint_root, 's_net', f'{args.arch}.tar')
    model, meta = load_model(s_path, args, None, device)
    data = RunData(args, device, meta)
    x, y = data.clean_subset(args.ratio, args.seed, device)
    s_name = os.path.splitext(os.path.basename(s_path))[0]
    print(f"{s_path}: {meta['arch']}, attack {data.attack['trigger_type']} {data.attack['target_type']} "
          f"target {data.attack['target_label']} (for evaluation only); {len(y)} clean images ({args.ratio:g} of train)")
    before = subset_accuracy(model, x, y, data.normalizer, args)
    return SimpleNamespace(device=device, model=model, meta=meta, data=data, x=x, y=y, s_path=s_path, s_name=s_name,
                           subset_before=before)


def subset_accuracy(model, x, y, normalizer, args):
    """Accuracy (%) on the defender's own clean images: the one check a defender can make."""
    was_training = model.training
    model.eval()
    ok = predict(model, x, normalizer, args.eval_batch_size, args.amp) == y
    model.train(was_training)
    return round(100.0 * ok.float().mean().item(), 2)


def defender_check(run, model, args, metrics):
    """Add the clean-subset accuracy before and after the defense to metrics, and warn (stdout and
    metrics['warning']) when it fell by more than config.COLLAPSE_POINTS: the defender sees the
    collapse without looking at the test set."""
    after = subset_accuracy(model, run.x, run.y, run.data.normalizer, args)
    metrics.update(subset_before=run.subset_before, subset_after=after, warning=None)
    print(f"defender's clean subset: accuracy {run.subset_before:.2f} before, {after:.2f} after")
    if after < run.subset_before - config.COLLAPSE_POINTS:
        metrics['warning'] = (f"the defense cut accuracy on the defender's clean subset from {run.subset_before:.2f} "
                              f'to {after:.2f}: the model is damaged')
        print(f"warning: {metrics['warning']}", flush=True)
    return metrics


def defense_meta(meta, args, defense):
    return dict(meta, defense=defense, defense_args=plain_args(args))
