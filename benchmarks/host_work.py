"""The host's share of a GPU step, measured without a GPU: the PSA branches (or whole PSAs) of a
model, planned as on CUDA, with the Triton kernels replaced by no-ops, on tiny tensors on the CPU.

On an H200 the steps with the Triton kernels were bound by the host (benchmarks/README.md, "GPU"):
the Python, dispatcher and small ops around the kernels, not the kernels. What is left here is
that work (and the tiny CPU convs of the branches the plans leave to cuDNN): its time per step,
the aten ops it calls (counted by torch's profiler, not those inside other aten ops) and the
Triton kernels it launches (each launch costs Triton's own host work too, binding and specialising
its arguments, which the no-ops skip). Times are this CPU's, so compare versions on one machine; the
counts are the same everywhere.

    python benchmarks/host_work.py                        # epsanet50_small's branches, the Triton plans
    python benchmarks/host_work.py --scope psa            # its whole PSAs: the attention too
    python benchmarks/host_work.py --plans cudnn --modes infer --top 10
    python benchmarks/host_work.py --plans cudnn+attention --scope model   # the attention's kernels alone
"""
import argparse
import collections
import os
import statistics
import time

os.environ.setdefault('TRITON_INTERPRET', '1')  # the kernels' host code runs on CPU tensors

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import timm  # noqa: E402
import timm_epsanet  # noqa: E402,F401
from timm_epsanet import _branch_conv, _triton_attention, _triton_branch, _triton_spc  # noqa: E402
from timm_epsanet.psa import PyramidSqueezeAttention  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='epsanet50_small')
    parser.add_argument('--plans', default='triton', choices=['triton', 'cudnn', 'cudnn+attention'],
                        help="CUDA's plans with the Triton kernels (TIMM_EPSANET_TRITON=1), without, or with "
                             "the attention's alone (=attention)")
    parser.add_argument('--scope', default='branches', choices=['branches', 'psa', 'model'],
                        help="each PSA's branch convs, each whole PSA (branches and attention), or the whole model "
                             "(on a 64x64 image; also for models without PSAs)")
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16'])
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--top', type=int, default=0, help='also list the most called ops')
    return parser.parse_args(argv)


class _NoKernel:
    """A Triton kernel that launches nothing: `kernel[grid](*args)` returns at once, counted in
    `launches`."""
    launches = 0

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        _NoKernel.launches += 1


def plan_as_cuda(triton: bool, attention: bool):
    """Every branch planned as on CUDA, with or without the Triton kernels, and the attention on
    `_triton_attention` or not; their launches no-ops."""
    plan_for = _branch_conv.BranchConv2d.plan_for
    _branch_conv.BranchConv2d.plan_for = lambda self, device_type, *args: plan_for(self, 'cuda', *args)
    _branch_conv.triton_in_auto = lambda: triton
    PyramidSqueezeAttention._attention_on_triton = lambda self, x: attention and _triton_attention.fusable(self.se)
    for module in (_triton_branch, _triton_spc, _triton_attention):
        for name in dir(module):
            if name.endswith('_kernel') and hasattr(getattr(module, name), 'run'):
                setattr(module, name, _NoKernel())


def psa_steps(model_name, dtype, scope='branches'):
    """The model's PSA branch modules (or whole PSAs, or the model: `scope`), each with a tiny
    channels-last input of its width and stride."""
    model = timm.create_model(model_name)
    if scope == 'model':
        x = torch.randn(2, 3, 64, 64, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return [(model.to(dtype, memory_format=torch.channels_last), x)]
    steps = []
    for psa in (m for m in model.modules() if isinstance(m, PyramidSqueezeAttention)):
        conv = psa.convs[0]
        size = 4 * conv.stride[0]
        x = torch.randn(2, conv.in_channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        module = psa.convs if scope == 'branches' else psa
        steps.append((module.to(dtype), x.requires_grad_()))
    return steps


def measure(steps, train, iters, top):
    """(median ms per step, aten ops per step, Triton launches per step, the most called ops) of
    every PSA's branches once."""
    for module, _ in steps:  # once, not per step: a mode switch drops the weights inference keeps
        module.train(train)

    def step():
        for module, x in steps:
            if train:
                module.zero_grad(set_to_none=True)  # as a training loop does: gradients stored, not added
                x.grad = None
                module(x).sum().backward()
            else:
                with torch.no_grad():
                    module(x)

    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    launched = _NoKernel.launches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    launches = _NoKernel.launches - launched
    ops = collections.Counter(e.name for e in prof.events() if e.name.startswith('aten::') and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::')))
    return statistics.median(times), sum(ops.values()), launches, ops.most_common(top)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # what no-op kernels leave in their outputs must not slow the CPU convs
    plan_as_cuda(args.plans == 'triton', attention=args.plans != 'cudnn')
    steps = psa_steps(args.model, getattr(torch, args.dtype), args.scope)
    kernels = {'triton': 'with the', 'cudnn': 'without the', 'cudnn+attention': "with the attention's"}[args.plans]
    print(f'{args.model}, {args.scope} ({len(steps)} modules), CUDA plans {kernels} '
          f'Triton kernels (no-ops), {args.dtype}, torch {torch.__version__}, 1 thread')
    for mode in args.modes:
        ms, ops, launches, most = measure(steps, mode == 'train', args.iters, args.top)
        print(f'{mode:<5} {ms:7.2f} ms per step, {ops} aten ops and {launches} Triton launches per step', flush=True)
        for name, count in most:
            print(f'    {count:5d}  {name}')


if __name__ == '__main__':
    main()
