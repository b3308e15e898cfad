"""--cuda_graphs on: a model's fixed-shape calls replayed as CUDA graphs.

A WRN-16-1 step at batch 64 is a few milliseconds of kernel launches: the GPU idles between them
(issue 40: 9% SM on an H200). Captured once, a call's hundreds of kernels replay as one graph launch.
install(model) puts a router in place of model.forward; each call goes to the graph captured for its
kind, or runs eagerly:

- a call's kind: the input's shape, dtype and strides, whether it needs a gradient, the non-tensor
  arguments (features=True), every module's train/eval mode, the parameters' and buffers' addresses and
  requires_grad. A new kind is captured on its first call; a ragged last batch or a swapped weight is
  another kind (at most config.CUDA_GRAPHS['max_graphs'] per model; later kinds run eagerly).
- with autograd (training steps, MCL's inversion, PGD): torch.cuda.make_graphed_callables, the forward
  and the backward as one autograd node each. Its saved activations live in the graph's memory, so a
  call of the same kind runs eagerly while the last one's backward may still run (not run yet, or run
  with retain_graph: I-BAU's hypergradient). Its backward cannot itself be differentiated: a
  create_graph=True through a graphed call stops with torch's error (I-BAU's comes after a call of its
  kind, so runs eagerly).
- without autograd (evaluation, a frozen teacher): a forward-only graph.
- eagerly, always: fp16/bf16 autocast, a model with hooks, a call inside another capture, weights that
  are not the model's own parameters (torch.func.functional_call: MCR's curve), tensors off the device.

The graphs replay the very kernels the eager call launches, on the same inputs: a step's result is the
eager one (bit for bit under --deterministic, expected; not measured here: no GPU). Outputs are cloned
out of the graph's memory, so callers may keep them. Capture runs a few warm-up calls: the BatchNorm
statistics they move are put back. Models with random layers (dropout) are not covered: none here has one.
"""
import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

import config
from errors import UserError

WARMUP = config.CUDA_GRAPHS['warmup']


def install(model, device, args, capture_autograd=None, capture_forward=None):
    """Route model's calls through graphs when args.cuda_graphs is 'on' and the device is a GPU. Returns the
    model. capture_*: stand-ins for the CUDA captures (the tests run the routing on the CPU with them)."""
    if getattr(args, 'cuda_graphs', 'off') != 'on':
        return model
    if device.type != 'cuda' and capture_autograd is None:
        say(f'CUDA graphs off ({device} has none; --cuda_graphs on is for CUDA devices)')
        return model
    if getattr(args, 'world_size', 1) > 1:
        raise UserError('--cuda_graphs on is for single-process runs, not under torchrun')
    if getattr(args, 'amp', False):
        say(f'CUDA graphs on for fp32 calls only: {args.amp} autocast calls run eagerly')
    model.forward = Router(model, device.type, capture_autograd or capture_with_autograd,
                           capture_forward or capture_without_autograd)
    return model


def say(line):
    """Print a line once per run (a defense loads its student and teacher: one line, not two)."""
    if line not in SAID:
        SAID.add(line)
        print(line, flush=True)


SAID = set()


def installed(model):
    return isinstance(model.__dict__.get('forward'), Router)


class Router:
    """model.forward while graphs are on: each call to its graph, or to the model's own forward."""

    def __init__(self, model, device_type, capture_autograd, capture_forward):
        self.model, self.device_type = model, device_type
        self.capture_autograd, self.capture_forward = capture_autograd, capture_forward
        self.graphs = {}      # kind -> Graph
        self.eager_calls = 0  # calls that ran eagerly (the tests read it)

    def eager(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, x, *args, **kwargs):
        kind = self.kind(x, args, kwargs)
        graph = self.graphs.get(kind) if kind is not None else None
        if kind is not None and graph is None and len(self.graphs) < config.CUDA_GRAPHS['max_graphs']:
            graph = self.graphs[kind] = self.capture(x, args, kwargs, kind[0])
        if graph is None or graph.busy:
            self.eager_calls += 1
            return self.eager(x, *args, **kwargs)
        return graph(x)

    def kind(self, x, args, kwargs):
        """What a graph of this call is fixed to, or None: the call runs eagerly."""
        extra = args + tuple(sorted(kwargs.items()))
        if not isinstance(x, torch.Tensor) or x.device.type != self.device_type or any(
                isinstance(a, torch.Tensor) for a in tree_flatten(extra)[0]):
            return None
        if torch.is_autocast_enabled(self.device_type) or (
                self.device_type == 'cuda' and torch.cuda.is_current_stream_capturing()):
            return None
        modules = list(self.model.modules())
        if any(has_hooks(m) for m in modules) or global_hooks():
            return None  # a hook's Python would run once, at capture, not at each replay
        params = list(self.model.parameters())
        if not all(isinstance(p, torch.nn.Parameter) and p.device == x.device for p in params):
            return None  # weights swapped in from outside (functional_call) or on another device
        autograd = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        return (autograd, x.requires_grad, tuple(x.shape), x.dtype, x.stride(), repr(extra),
                tuple(m.training for m in modules), tuple((p.data_ptr(), p.requires_grad) for p in params),
                tuple(b.data_ptr() for b in self.model.buffers()))

    def capture(self, x, args, kwargs, autograd):
        """Capture a graph of this call; the warm-up's moves of BatchNorm statistics are undone."""
        buffers = list(self.model.buffers())
        saved = [b.clone() for b in buffers]
        call = Call(self.eager, args, kwargs, self.model)
        sample = x.detach().clone().requires_grad_(x.requires_grad)
        graph = self.capture_autograd(call, sample) if autograd else self.capture_forward(call, sample)
        for b, s in zip(buffers, saved):  # through .data: a call's autograd graph may hold b (BatchNorm saves
            b.data.copy_(s)               # its running statistics); their values are not what its backward reads
        return Graph(graph, autograd)

    def __deepcopy__(self, memo):
        """A copy of the model (a frozen reference, a teacher) gets its own router and graphs."""
        return Router(memo[id(self.model)], self.device_type, self.capture_autograd, self.capture_forward)


class Call(torch.nn.Module):
    """One kind of call (its non-tensor arguments fixed) as a module: the model's parameters are its own,
    so make_graphed_callables takes them as the graph's inputs and returns their gradients."""

    def __init__(self, forward, args, kwargs, model):
        super().__init__()
        self.forward_fn, self.args, self.kwargs = forward, args, kwargs
        self.model = model

    def forward(self, x):
        return self.forward_fn(x, *self.args, **self.kwargs)


class Graph:
    """A captured call. busy: an autograd call's backward may still run (not run yet, or run with
    retain_graph): its activations are the graph's, and a replay now would overwrite them."""

    def __init__(self, run, autograd):
        self.run, self.autograd, self.last = run, autograd, None

    def __call__(self, x):
        leaves, spec = tree_flatten(self.run(x))
        if not self.autograd:
            return tree_unflatten([t.clone() for t in leaves], spec)
        out = Tap.apply(*leaves)
        self.last = weakref.ref(out[0].grad_fn)
        return tree_unflatten(list(out), spec)

    @property
    def busy(self):
        node = self.last() if self.last else None
        if node is None:  # the outputs and their autograd graph are gone
            return False
        try:
            node.saved_tensors
            return True
        except RuntimeError:  # freed by a backward without retain_graph: it cannot run again
            return False


class Tap(torch.autograd.Function):
    """The graph's outputs cloned out of its memory (callers may keep them), through a node whose saved
    marker tells when autograd is done with the call (Graph.busy)."""

    @staticmethod
    def forward(ctx, *outputs):
        ctx.save_for_backward(torch.empty(0))
        return tuple(t.clone() for t in outputs)

    @staticmethod
    def backward(ctx, *grads):
        return grads


def capture_with_autograd(call, sample):
    """Forward and backward captured as one autograd node (parameters that are unused get no gradient)."""
    # (the Call's own training flag, which the graphed module checks, never changes: the kind holds the modes)
    return torch.cuda.make_graphed_callables(call, (sample,), num_warmup_iters=WARMUP, allow_unused_input=True)


def capture_without_autograd(call, sample):
    """A forward-only graph: the input copied into its static tensor, the graph replayed."""
    static = sample.detach().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # cuDNN picks its kernels and allocations settle before capture
        for _ in range(WARMUP):
            call(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(static)

    def run(x):
        static.copy_(x)
        graph.replay()
        return out
    return run


def has_hooks(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_hooks():
    g = torch.nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)
