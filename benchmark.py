"""Throughput of the pieces every run is made of, on this machine, side by side with the usual
per-sample torchvision + DataLoader input path the published code uses.

    python benchmark.py                    # CPU or CUDA, whichever --device picks
    python benchmark.py --device cpu --threads 2

    python benchmark.py --end_to_end --data_root /tmp/data/cifar10   # + each defense's wall time

Prints images/s of: the device batch pipeline (crop+flip+normalise), the reference
DataLoader pipeline, and, in fp32 and bf16 autocast side by side, WRN-16-1 train steps, MCL
inversion steps (the pattern's gradient only, parameters frozen) and evaluation; on a GPU also
the same in fp32 replayed as CUDA graphs (cuda_graphs.py), and the mean SM utilisation of each (NVML,
where nvidia-ml-py is installed).
Data are random uint8 images: throughput does not depend on content. With --end_to_end it
then runs each defense's script as a user would (shipped BadNets model, 5% clean data, the
same commands as run_table.py's cells, outputs in a temporary folder) and prints its wall time and final summary.
"""
import contextlib
import os
import tempfile
import threading
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import config
from batching import Normalizer, train_batches
from cli import main_guard, parse_args
from defenses import unknown
from device import autocast, prepare_model, setup
from inversion import size_penalty, stamp
from models import select_model
from table import COLUMNS, cell_commands


SM = {'last': None}  # the mean SM utilisation (%) of the last timed section on a GPU, where NVML answers


def timed(fn, device, repeat=1):
    fn()  # warm-up (allocator, kernels, compile)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    with sm_sampled(device):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeat


@contextlib.contextmanager
def sm_sampled(device, every=0.05):
    """Poll the GPU's SM utilisation (NVML, through torch.cuda.utilization) while the block runs; its mean
    goes to SM['last'] (None on the CPU, or where NVML is missing: pip install nvidia-ml-py)."""
    SM['last'], samples, stop = None, [], threading.Event()

    def poll():
        while not stop.wait(every):
            try:
                samples.append(torch.cuda.utilization(device))
            except Exception:  # no NVML: nothing to report
                return
    thread = threading.Thread(target=poll, daemon=True) if device.type == 'cuda' else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        if thread:
            stop.set()
            thread.join()
            SM['last'] = sum(samples) / len(samples) if samples else None


def sm_note():
    return f"   SM {SM['last']:.0f}%" if SM['last'] is not None else ''


def pipeline_rate(x, y, normalizer, device, batch_size):
    def one_epoch():
        for xb, _ in train_batches(x, y, batch_size, normalizer, 0, 0):
            xb.sum()  # touch it, as a model would
    return len(y) / timed(one_epoch, device)


def reference_rate(x, y, n=5000, batch_size=128):
    """The published input path: PIL image per sample, torchvision transforms, DataLoader."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset
    tf = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])

    class Images(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return tf(x[i].numpy()), int(y[i])
    loader = DataLoader(Images(), batch_size=batch_size, shuffle=True)
    return n / timed(lambda: [b for b in loader], torch.device('cpu'))


def train_rate(model, x, y, normalizer, device, batch_size, amp, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [b for _, b in zip(range(steps), train_batches(x, y, batch_size, normalizer, 0, 0))]

    def run():
        for xb, yb in batches:
            with autocast(device, amp):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return len(batches) * batch_size / timed(run, device)


def inversion_rate(model, x, normalizer, device, batch_size, amp, steps):
    """MCL's inversion step: a pattern's gradient through the frozen model (eval mode, no weight gradients)."""
    model.eval().requires_grad_(False)
    pattern = torch.zeros(3, 32, 32, device=device, requires_grad=True)
    opt = torch.optim.Adam([pattern], lr=0.1)
    target = torch.zeros(batch_size, dtype=torch.long, device=device)

    def run():
        for i in range(steps):
            with autocast(device, amp):
                out = model(stamp(x[i * batch_size:(i + 1) * batch_size], pattern, normalizer))
            loss = F.cross_entropy(out.float(), target) + 1e-3 * size_penalty(pattern)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    rate = steps * batch_size / timed(run, device)
    model.train().requires_grad_(True)
    return rate


@torch.no_grad()
def eval_rate(model, x, normalizer, device, batch_size, amp):
    model.eval()

    def run():
        for i in range(0, len(x), batch_size):
            with autocast(device, amp):
                model(normalizer(x[i:i + batch_size])).argmax(1)
    rate = len(x) / timed(run, device)
    model.train()
    return rate


def defense_wall_times(args):
    """Each defense as its own process, as a user runs it, on the shipped BadNets model (the same
    commands as run_table.py's cells): (name, seconds, summary) per defense."""
    model = args.s_model or os.path.join(args.checkpoint_root, 's_net', f"{config.MODEL['arch']}.tar")
    with tempfile.TemporaryDirectory() as tmp:
        names = [name for name in COLUMNS if name not in ('none', 'floor')]  # FT first: NAD's and ARGD's teacher
        if args.defenses:
            names = [name for name in names if name in args.defenses.split(',')]
        for name, cell in cell_commands(args, 'badnet', args.seed, tmp, tmp, given_model=model, names=names).items():
            metrics, seconds = cell()
            yield COLUMNS[name]['label'], seconds, metrics


def main():
    args = parse_args('benchmark.py', description=__doc__.split('\n\n')[0])
    not_columns = set((args.defenses or '').split(',')) - set(COLUMNS) - {''}
    if not_columns:
        raise unknown(sorted(not_columns)[0])
    device = setup(args)
    print(f'device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}')
    if args.pieces:
        pieces(args, device)
    if args.end_to_end:
        for name, seconds, m in defense_wall_times(args):
            print(f"{name + ' end to end:':32s} {seconds:8.1f} s   ACC {m['ACC']:.2f} ASR {m['ASR']:.2f} RA {m['RA']:.2f}",
                  flush=True)


def pieces(args, device):
    """Images/s of the batch pipeline, the reference DataLoader, and the train, inversion and evaluation steps."""
    cuda = device.type == 'cuda'
    n = 50000 if cuda else 10000
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    xd, yd = x.to(device), y.to(device)
    normalizer = Normalizer('cifar', device)

    pipe = pipeline_rate(xd, yd, normalizer, device, args.batch_size)
    print(f'batch pipeline (crop+flip+normalise on device): {pipe:12,.0f} images/s{sm_note()}')
    ref = reference_rate(x, y)
    print(f'reference DataLoader + PIL transforms:         {ref:12,.0f} images/s   (ours x{pipe / ref:.1f})')

    steps = 200 if cuda else 40
    # fp32 and bf16 autocast side by side; on a GPU also fp32 with its calls replayed as CUDA graphs
    variants = [('fp32', False, False), ('bf16', True, False)] + ([('fp32 CUDA graphs', False, True)] if cuda else [])
    for name, amp, graphs in variants:
        for compile_it in ((False, True) if args.time_compiled and not graphs else (False,)):
            torch.manual_seed(0)
            model = prepare_model(select_model(config.MODEL['arch'], 10), device,
                                  SimpleNamespace(cuda_graphs='on' if graphs else 'off', amp=amp))
            rate = train_rate(torch.compile(model) if compile_it else model, xd, yd, normalizer, device,
                              args.batch_size, amp, steps)
            print(f"train step WRN-16-1 {name}{' compiled' if compile_it else ''}: {rate:12,.0f} images/s   "
                  f'(pipeline = {100 * rate / pipe:.1f}% of a step){sm_note()}', flush=True)
        inv = inversion_rate(model, xd, normalizer, device, args.batch_size, amp, steps)
        print(f'MCL inversion step {name}:        {inv:12,.0f} images/s{sm_note()}', flush=True)
        ev = eval_rate(model, xd[:10000], normalizer, device, args.eval_batch_size, amp)
        print(f'evaluation {name} (batch {args.eval_batch_size}):    {ev:12,.0f} images/s{sm_note()}', flush=True)


if __name__ == '__main__':
    main_guard(main)
