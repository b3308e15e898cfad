"""Where a run computes: the device, threads and seed, the precision the device computes fastest,
torch.compile where its toolchain is found, and torchrun's process group."""
import ctypes
import importlib.util
import os
import shutil
import sys
import sysconfig

import torch

import config
import cuda_graphs
from errors import UserError


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
    if device.type == 'cuda':
        use_tf32()
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
    auto picks what ran fastest where it was measured: on CPUs with AMX/AVX512-BF16 bf16 (about 2x fp32
    per train step); on GPUs with TF32 tensor cores (compute capability 8.0 or newer) fp32, which runs on
    them as TF32 (use_tf32): on an H200 bf16 autocast made a batch-64 WRN-16-1 train step 22% slower
    (9,292 against 11,956 images/s; these models are small enough that a step is bound by kernel
    launches, and autocast adds a cast per layer); on 7.x GPUs (V100, T4: no TF32, bf16 only emulated)
    fp16 autocast, not measured; else fp32."""
    if precision == 'fp16' and device.type != 'cuda':
        raise UserError('--precision fp16 is for CUDA GPUs; use bf16 or fp32 on the CPU')
    native = native_precision(device)
    if precision == 'auto':
        if native is not None and native[0] == 'bf16' and device.type == 'cuda':
            return False, f'fp32 on TF32 tensor cores ({native[1]}: bf16 autocast measured slower for these models)'
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


def use_tf32():
    """fp32 matrix products and convolutions on TF32 tensor cores (GPUs of compute capability 8.0 or newer;
    a no-op before): cuDNN's convolutions default to it, matmuls (the linear heads, ARGD's projections) do
    not. Deterministic like fp32, with a 10-bit mantissa in the products. Called for CUDA runs only."""
    torch.set_float32_matmul_precision('high')
    torch.backends.cudnn.allow_tf32 = True


def autocast(device, amp):
    """amp: 'bf16', 'fp16' or False (fp32; True is bf16, for callers that only switch it on)."""
    return torch.autocast(device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16, enabled=bool(amp))


def prepare_model(model, device, args=None):
    """Move to the device in channels_last layout: batches arrive as NHWC memory, and it
    measured faster on CPU too (see README, Performance). With args: its calls through CUDA graphs
    where --cuda_graphs on asks (cuda_graphs.py)."""
    model = model.to(device=device, memory_format=torch.channels_last)
    return cuda_graphs.install(model, device, args) if args is not None else model


def compiled(model, args, device):
    """torch.compile the model where asked (on), or with auto on the CPU where its toolchain is found: it
    costs a one-off compile (~15 s here) and pays it back within the first epochs of a backdoor training
    (29.6 -> 24.3 s an epoch, bf16). Not by auto on CUDA: on an H200 a compiled batch-64 WRN-16-1 step was
    21% slower than eager (9,404 against 11,956 images/s, fp32)."""
    if args.compile == 'on' and cuda_graphs.installed(model):
        raise UserError('--cuda_graphs on replays the eager kernels and does not compose with torch.compile: '
                        'use --compile off')
    missing = compile_toolchain_missing(device)
    if args.compile == 'on' and missing:
        raise UserError(f'--compile on needs {missing}; use --compile off')
    use = args.compile == 'on' or (args.compile == 'auto' and not missing and device.type != 'cuda')
    why = (f'{missing} not found' if missing else 'measured slower on a GPU') if args.compile == 'auto' and not use \
        else f'--compile {args.compile}'
    print(f"torch.compile {'on' if use else 'off'} ({why})", flush=True)
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


def unwrap(model):
    """The model itself under torch.compile's wrapper."""
    return getattr(model, '_orig_mod', model)
