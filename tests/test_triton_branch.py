"""The Triton PSA branch kernels (`timm_epsanet._triton_branch`, `timm_epsanet._triton_spc`) and the
'triton', 'triton_mma' and 'triton_spc' branch forms (CUDA-core kernels, tensor-core kernels, and
tensor-core kernels that compute the branches sharing input slices together).

The kernels run here on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), in one
subprocess for the whole file: the variable must be set before triton is imported, and must not
leak into the other tests. That proves the arithmetic (forward, input and weight gradients equal
to the plain grouped conv up to float summation order), the custom ops' fake tensors, schema and
autograd registration, and that torch.compile traces one op with no graph break. Compilation for
a GPU, bf16 and speed are for benchmarks/cuda_checks.py on a CUDA machine.

    python tests/test_triton_branch.py    # the interpreter part alone, as the subprocess runs it
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from timm_epsanet import _branch_plans

# the kernels refuse an older triton by name (tests/test_psa.py); its interpreter differs too
pytestmark = pytest.mark.skipif(_branch_plans.triton_too_old(), reason=_branch_plans.triton_too_old_message())

ROOT = Path(__file__).resolve().parents[1]

# (in_chs, out_chs, kernel, groups, stride, dilation, channels_last, dtype): EPSANet-like shapes in
# miniature: 1-4 outputs per group (also 3, not a power of 2), 1-32 groups, kernels 3-9
CASES = [
    (16, 4, 3, 4, 1, 1, False, 'float32'),
    (16, 16, 5, 4, 1, 1, True, 'float32'),
    (32, 16, 7, 8, 2, 1, True, 'float32'),
    (32, 16, 9, 16, 1, 2, True, 'float32'),
    (16, 8, 9, 1, 2, 1, False, 'float32'),
    (64, 32, 5, 32, 1, 1, True, 'float32'),
    (24, 24, 3, 8, 2, 2, False, 'float32'),
    (32, 16, 7, 8, 2, 1, True, 'float16'),
]


FORMS = ('triton', 'triton_mma')  # one branch alone ('triton_spc' alone is 'triton_mma')
ALL_FORMS = FORMS + ('triton_spc',)

# PSAs whose 'triton_spc' branches are computed together: (PSA arguments, the runs of branches
# fused, channels_last, dtype). Small's stage 1 in miniature (kernels 5-9 each merged into one
# group of 64 -> 16, which the dense kernel-3 branch joins), Large's (all four alike), one where
# only two fuse (kernel 5's merged groups are wider, as in Small's stage 4, and the dense branch
# reads all 32 channels), stride 2, dilation 2, NCHW, fp16, kernels in no order
SPC_CASES = [
    (dict(in_chs=64), [[0, 1, 2, 3]], True, 'float32'),
    (dict(in_chs=32, groups=(8, 8, 8, 8)), [[0, 1, 2, 3]], True, 'float32'),
    (dict(in_chs=32, out_chs=256, groups=(1, 2, 4, 4)), [[2, 3]], True, 'float32'),
    (dict(in_chs=64, stride=2), [[0, 1, 2, 3]], False, 'float32'),
    (dict(in_chs=32, groups=(8, 8, 8, 8), dilation=2), [[0, 1, 2, 3]], True, 'float16'),
    # kernels out of order: fused in ascending order, each output back in its branch's place
    (dict(in_chs=32, groups=(8, 8, 8, 8), kernel_sizes=(9, 5, 7, 3)), [[3, 1, 2, 0]], True, 'float32'),
]


SPC_NCHW_CASE = SPC_CASES[3]  # the kernels run in channels-last; this one also with NCHW strides


def spc_case_id(case) -> str:
    kwargs, _, channels_last, dtype = case
    return '-'.join([f'{k}{v}' for k, v in kwargs.items()] + ['cl' if channels_last else 'nchw', dtype])


# the cases with branches on the tensor-core kernels that fuse with none: kernel 5, whose merged
# groups are wider than the others' (as Small's stage 4)
ALONE_ON_TENSOR_CORES = {spc_case_id(SPC_CASES[2]): 1}


def case_id(case, form='triton') -> str:
    in_chs, out_chs, k, groups, stride, dilation, channels_last, dtype = case
    layout = 'cl' if channels_last else 'nchw'
    return f'{form}-{in_chs}to{out_chs}-k{k}-g{groups}-s{stride}-d{dilation}-{layout}-{dtype}'


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_case(case, form) -> dict:
    """Errors of a branch in `form` against F.conv2d and its autograd (in float64), and the
    output's layout. 'triton_mma' merges the groups (block-diagonal weights) before its kernels."""
    import torch.nn.functional as F
    from timm_epsanet._branch_conv import BranchConv2d

    in_chs, out_chs, k, groups, stride, dilation, channels_last, dtype = case
    dtype = getattr(torch, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, in_chs, 9, 11).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(out_chs, in_chs // groups, k, k).to(dtype)
    padding = dilation * (k - 1) // 2
    x_ref, w_ref = x.double().requires_grad_(), w.double().requires_grad_()
    y_ref = F.conv2d(x_ref, w_ref, None, stride, padding, dilation, groups)
    grad = torch.randn_like(y_ref).to(dtype)
    y_ref.backward(grad.double())
    conv = BranchConv2d(in_chs, out_chs, k, stride, padding, dilation, groups, bias=False, form=form).to(dtype)
    conv.weight.data.copy_(w)
    x_t = x.clone().requires_grad_()
    y = conv.forward_as(x_t, form)
    y.backward(grad)
    w_grad = conv.weight.grad
    return dict(
        shape_ok=y.shape == y_ref.shape, dtype_ok=y.dtype == dtype and x_t.grad.dtype == dtype == w_grad.dtype,
        layout_ok=y.is_contiguous(memory_format=fmt) and x_t.grad.is_contiguous(memory_format=fmt),
        out=rel_err(y, y_ref), grad_input=rel_err(x_t.grad, x_ref.grad), grad_weight=rel_err(w_grad, w_ref.grad))


def check_spc_case(case, kernel_layout=None) -> dict:
    """A PSA's branches planned 'triton_spc' against the grouped convs and their autograd (float64):
    which runs fused, how often the fused kernels ran and the layouts they read, errors of the
    concatenated output and of the input and weight gradients, and the output's layout. The
    plans are CUDA's (the kernels in channels-last), or with `kernel_layout` in that layout."""
    from timm_epsanet import _triton_branch, _triton_spc
    from timm_epsanet.psa import PyramidSqueezeAttention

    kwargs, _, channels_last, dtype = case
    dtype = getattr(torch, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    reference = PyramidSqueezeAttention(**kwargs, branch_form='grouped').convs.double()
    convs = PyramidSqueezeAttention(**kwargs, branch_form='triton_spc').convs.to(dtype)
    convs.load_state_dict(reference.state_dict())
    x = torch.randn(2, kwargs['in_chs'], 7, 9).to(dtype).contiguous(memory_format=fmt)
    x_ref, x_spc = x.double().requires_grad_(), x.clone().requires_grad_()
    y_ref = reference(x_ref)
    grad = torch.randn_like(y_ref).to(dtype)
    y_ref.backward(grad.double())
    plans = [conv.plan_for('cuda', True) for conv in convs]
    if kernel_layout:
        plans = [(form, kernel_layout) for form, _ in plans]
    launches = dict.fromkeys(('forward', 'grad_input', 'grad_weight', 'alone_forward', 'alone_grad_input',
                              'alone_grad_weight', 'custom_op'), 0)
    read = set()
    originals = {name: getattr(_triton_spc, name) for name in (
        '_launch_tiles', '_weight_grad_parts', '_launch_conv_tiles', '_weight_grad_part')}
    custom_ops = {(module, name): getattr(module, name) for module, name in (
        (_triton_spc, '_spc_op'), (_triton_branch, '_conv_op'), (_triton_branch, '_grad_input_op'),
        (_triton_branch, '_grad_weight_op'), (_triton_spc, '_grad_input_op'))}

    def counted(name, alone):
        def launch(src, *args, **kw):
            kind = 'grad_weight' if 'weight' in name else 'grad_input' if kw.get('transposed') else 'forward'
            launches[('alone_' if alone else '') + kind] += 1
            read.add('channels_last' if src.stride(1) == 1 else 'nchw')  # also of a slice of the channels
            return originals[name](src, *args, **kw)
        return launch

    def counted_op(op):
        def call(*args):
            launches['custom_op'] += 1
            return op(*args)
        return call

    runs, spc_runs = [], convs.spc_runs
    convs.spc_runs = lambda *args: runs.append(spc_runs(*args)) or runs[-1]  # as run_plans resolves the layouts
    for name in originals:
        setattr(_triton_spc, name, counted(name, alone=name in ('_launch_conv_tiles', '_weight_grad_part')))
    for (module, name), op in custom_ops.items():
        setattr(module, name, counted_op(op))
    try:
        y = convs.run_plans(x_spc, plans)
        y.backward(grad)
    finally:
        for name, launch in originals.items():
            setattr(_triton_spc, name, launch)
        for (module, name), op in custom_ops.items():
            setattr(module, name, op)
    return dict(
        runs=runs[0], launches=launches, kernel_layouts=sorted(read),
        dtype_ok=y.dtype == x_spc.grad.dtype == dtype,
        layout_ok=y.is_contiguous(memory_format=fmt) and x_spc.grad.is_contiguous(memory_format=fmt),
        out=rel_err(y, y_ref), grad_input=rel_err(x_spc.grad, x_ref.grad),
        grad_weight=max(rel_err(c.weight.grad, r.weight.grad) for c, r in zip(convs, reference)))


def check_spc_inference() -> dict:
    """Inference (eval mode) of fused branches twice, then after an in-place weight update: how many
    kernel weight tiles each forward built, and each output's error against the grouped convs."""
    from timm_epsanet import _triton_spc
    from timm_epsanet.psa import PyramidSqueezeAttention

    reference = PyramidSqueezeAttention(32, groups=(8, 8, 8, 8), branch_form='grouped').convs
    convs = PyramidSqueezeAttention(32, groups=(8, 8, 8, 8), branch_form='triton_spc').convs.eval()
    convs.load_state_dict(reference.state_dict())
    plans = [conv.plan_for('cuda', False) for conv in convs]
    x = torch.randn(2, 32, 5, 6).contiguous(memory_format=torch.channels_last)
    built, branch_tiles = [], _triton_spc.branch_tiles
    _triton_spc.branch_tiles = lambda *args, **kw: built.append(1) or branch_tiles(*args, **kw)
    results = []
    try:
        for update in (False, False, True):
            with torch.no_grad():
                if update:
                    for a, b in zip(convs, reference):
                        a.weight.mul_(-2)
                        b.weight.mul_(-2)
                before = len(built)
                y = convs.run_plans(x, plans)
                results.append(dict(built=len(built) - before, err=rel_err(y, reference(x))))
    finally:
        _triton_spc.branch_tiles = branch_tiles
    return results


# PSAs whose attention runs on `_triton_attention`: (PSA arguments, channels_last, dtype). Small's
# stage 1 in miniature; 3 scales (padded to 4) in NCHW; fp16 (fp32 weights, as under autocast);
# 256 channels per scale and 16 hidden features, more than one channel block of the kernels (Large's stage 4)
ATTENTION_CASES = [
    (dict(in_chs=64), True, 'float32'),
    (dict(in_chs=48, kernel_sizes=(3, 5, 7), groups=(1, 4, 8)), False, 'float32'),
    (dict(in_chs=64), True, 'float16'),
    (dict(in_chs=1024, groups=(32, 32, 32, 32)), True, 'float32'),
]


def check_attention(case) -> dict:
    """A PSA with its attention on the Triton kernels against the plain PSA in float64: output, and
    the gradients of the input and of every parameter (SEWeight's too); then inference, which
    reweights in place."""
    from timm_epsanet._triton_attention import fusable
    from timm_epsanet.psa import PyramidSqueezeAttention

    kwargs, channels_last, dtype = case
    dtype = getattr(torch, dtype)
    reference = PyramidSqueezeAttention(**kwargs, branch_form='grouped').double()
    reference.se.fc1.bias.data.uniform_(0.5, 1.0)  # every hidden feature alive: a dead ReLU has no gradient
    psa = PyramidSqueezeAttention(**kwargs, branch_form='grouped')
    psa.load_state_dict(reference.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, kwargs['in_chs'], 3, 4).contiguous(memory_format=fmt)
    x_ref, x_t = x.double().requires_grad_(), x.to(dtype, copy=True).requires_grad_()
    y_ref = reference(x_ref)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    used, on_triton = [], PyramidSqueezeAttention._attention_on_triton
    # as on CUDA with the Triton forms: where the kernels compute PSA's SEWeight
    PyramidSqueezeAttention._attention_on_triton = lambda self, x: used.append(fusable(self.se)) or used[-1]
    if dtype != torch.float32:
        psa.convs.to(dtype)  # the branches in fp16; SEWeight's weights stay fp32, as under autocast
    y = psa(x_t)
    y.backward(grad.to(dtype))
    with torch.no_grad():
        y_infer = psa(x.to(dtype))
    PyramidSqueezeAttention._attention_on_triton = on_triton
    # the plain module in fp32: the bias gradients sum terms that cancel, so even it is off by more than 1e-5
    plain = PyramidSqueezeAttention(**kwargs, branch_form='grouped')
    plain.load_state_dict(reference.state_dict())
    plain(x.clone()).backward(grad.float())
    return dict(
        used=used, dtype_ok=y.dtype == x_t.grad.dtype == dtype,
        layout_ok=y.is_contiguous(memory_format=fmt) and x_t.grad.is_contiguous(memory_format=fmt),
        out=rel_err(y, y_ref), infer=rel_err(y_infer, y_ref), grad_input=rel_err(x_t.grad, x_ref.grad),
        grad_params={name: (rel_err(p.grad, r.grad), rel_err(q.grad, r.grad)) for (name, p), q, r in zip(
            psa.named_parameters(), plain.parameters(), reference.parameters())})


def check_double_backward() -> dict:
    """Whether a second derivative through the fused branches, and through the attention's kernels,
    is refused (their gradients are kernels, not differentiable ops): the error's message, or None."""
    from timm_epsanet.psa import PyramidSqueezeAttention

    psa = PyramidSqueezeAttention(32, groups=(8, 8, 8, 8), branch_form='triton_spc')
    plans = [conv.plan_for('cuda', True) for conv in psa.convs]
    on_triton = PyramidSqueezeAttention._attention_on_triton
    PyramidSqueezeAttention._attention_on_triton = lambda self, x: True  # as on CUDA
    refused = {}
    try:
        for name, forward in (('branches', lambda x: psa.convs.run_plans(x, plans)), ('attention', psa)):
            x = torch.randn(2, 32, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
            (grad,) = torch.autograd.grad(forward(x).square().sum(), x, create_graph=True)
            try:
                grad.sum().backward()
                refused[name] = None
            except RuntimeError as e:
                refused[name] = str(e)
    finally:
        PyramidSqueezeAttention._attention_on_triton = on_triton
    return refused


def check_prep() -> dict:
    """The fused kernels' weight preparation in one launch (`branch_tiles`) against the custom
    ops' (`_weight_pointers` of `block_diagonal_weight`), both directions, on Small's stage 1
    (merges 1, 4, 8, 16), and the one-launch weight gradients against the diagonal blocks of the
    partial sums."""
    from timm_epsanet import _triton_spc
    from timm_epsanet._branch_forms import block_diagonal_weight
    from timm_epsanet.psa import PyramidSqueezeAttention

    convs = PyramidSqueezeAttention(64, groups=(1, 4, 8, 16)).convs
    weights, merges = [c.weight.detach() for c in convs], [c.mma_regroup for c in convs]
    result = {}
    for transposed in (False, True):
        tiles = _triton_spc.branch_tiles(weights, merges, 1, torch.float16, transposed)
        merged = [block_diagonal_weight(w.half(), c.groups, m) for w, c, m in zip(weights, convs, merges)]
        expected = _triton_spc._weight_pointers(merged, 1, transposed)
        result[f'tiles transposed={transposed}'] = all(torch.equal(a, b) for a, b in zip(tiles, expected))
    # partial sums of the merged weights' gradients over 3 chunks: each branch's grouped weight
    # gradient is the sum of the diagonal blocks
    parts = [torch.randn(3, k, k, 1, 64, 16) for k in (3, 5, 7, 9)]
    grads = _triton_spc._branch_weight_grads(parts, weights, merges)
    expected = []
    for part, w, c, m in zip(parts, weights, convs, merges):
        merged = part.sum(0).permute(2, 4, 3, 0, 1).reshape(16, 64, w.shape[-1], w.shape[-1])  # (O, merged I, K, K)
        mask = block_diagonal_weight(torch.ones_like(w), c.groups, m) != 0
        expected.append(merged[mask].reshape(w.shape))
    result['grads'] = max(rel_err(a, b) for a, b in zip(grads, expected))
    return result


def check_ops() -> dict:
    """torch.library.opcheck of the three ops: schema, fake tensors, autograd registration, AOT dispatch."""
    from timm_epsanet import _triton_branch  # noqa: F401  registers the ops
    ops = torch.ops.timm_epsanet
    x = torch.randn(2, 16, 7, 6).contiguous(memory_format=torch.channels_last)
    w, grad = torch.randn(8, 4, 3, 3), torch.randn(2, 8, 7, 6)
    failed = {}
    for tensor_cores in (False, True):
        args = ([1, 1], [1, 1], [1, 1], 4, tensor_cores)
        results = {
            'branch_conv': torch.library.opcheck(ops.branch_conv.default, (x.requires_grad_(), w.requires_grad_(), *args)),
            'grad_input': torch.library.opcheck(ops.branch_conv_grad_input.default, (grad, w.detach(), x.detach(), *args)),
            'grad_weight': torch.library.opcheck(ops.branch_conv_grad_weight.default, (x.detach(), grad, w.detach(), *args)),
        }
        for op, result in results.items():
            failed.setdefault(op, []).extend(f'{name} (tensor_cores={tensor_cores})'
                                             for name, status in sorted(result.items()) if status != 'SUCCESS')
    from timm_epsanet import _triton_spc  # noqa: F401  registers the fused ops
    weights = [torch.randn(8, 16, k, k).requires_grad_() for k in (3, 5)]
    grad = torch.randn(2, 16, 7, 6)
    results = {
        'spc_conv': torch.library.opcheck(ops.spc_conv.default, (x.detach().requires_grad_(), weights, [1, 1], [1, 1], 1)),
        'spc_grad_input': torch.library.opcheck(
            ops.spc_conv_grad_input.default, (grad, [w.detach() for w in weights], x.detach(), [1, 1], 1)),
        'spc_grad_weight': torch.library.opcheck(
            ops.spc_conv_grad_weight.default, (x.detach(), grad, [w.detach() for w in weights], [1, 1], [1, 1], 1)),
    }
    for op, result in results.items():
        failed[op] = [name for name, status in sorted(result.items()) if status != 'SUCCESS']
    return failed


def compiled_against(loss, reference_loss, x, op: str, backend: str = 'aot_eager') -> dict:
    """torch.compile of `loss` (full graph): graph breaks, calls of `op` in the graph, loss and
    input gradient against `reference_loss`'s."""
    explained = torch._dynamo.explain(loss)(x)
    code = '\n'.join(graph.code for graph in explained.graphs)
    compiled = torch.compile(loss, backend=backend, fullgraph=True)(x)
    compiled.backward()
    grad_compiled, x.grad = x.grad, None
    reference = reference_loss(x)
    reference.backward()
    return dict(graph_breaks=explained.graph_break_count, ops=code.count(f'torch.ops.timm_epsanet.{op}'),
                loss=rel_err(compiled, reference), grad=rel_err(grad_compiled, x.grad))


def check_compile(form) -> dict:
    """torch.compile of a branch in `form`."""
    import torch.nn.functional as F
    from timm_epsanet._branch_conv import BranchConv2d

    conv = BranchConv2d(16, 8, 5, padding=2, groups=4, bias=False, form=form)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    return compiled_against(lambda x: conv.forward_as(x, form).square().sum(),
                            lambda x: F.conv2d(x, conv.weight, None, 1, 2, 1, 4).square().sum(), x, 'branch_conv')


def check_spc_compile() -> dict:
    """torch.compile of a PSA's branches planned 'triton_spc' (Small's stage 1 in miniature), by
    inductor, which lowers the fused ops and their gradients (lists of weights in, and out)."""
    from timm_epsanet.psa import PyramidSqueezeAttention

    convs = PyramidSqueezeAttention(64, branch_form='triton_spc').convs
    plans = [conv.plan_for('cuda', True) for conv in convs]
    x = torch.randn(2, 64, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    return compiled_against(
        lambda x: convs.run_plans(x, plans).square().sum(),
        lambda x: torch.cat([conv.forward_as(x, 'grouped') for conv in convs], 1).square().sum(), x, 'spc_conv',
        backend='inductor')


def check_wide_weight_grad() -> dict:
    """Both weight-gradient kernels on rows wider than their pixel tile (tiles of part of a row,
    several per row), the tensor-core one with one tap and with 4 taps per program (a row of 3 and
    a masked one): errors against the grouped conv's weight gradient."""
    import torch.nn.functional as F
    from timm_epsanet import _triton_branch as tb

    x = torch.randn(2, 16, 5, 37).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3)
    w_ref = w.double().requires_grad_()
    y = F.conv2d(x.double(), w_ref, None, 1, 1, 1, 4)
    grad = torch.randn_like(y)
    y.backward(grad)
    errors = {}
    for name, config in (('cuda_cores', tb.Config(8, 4, 4, 2)), ('mma', tb.Config(16, 1, 16, 16)),
                         ('mma, 4 taps', tb.Config(16, 1, 16, 16, block_t=4))):
        got = tb._launch_weight_grad(x, grad.float(), w, (1, 1), (1, 1), (1, 1), 4, config, name != 'cuda_cores')
        errors[name] = rel_err(got, w_ref.grad)
    return errors


def check_stacked_weight_grad() -> dict:
    """The fused weight gradient with the branches that reach a tap in one product
    (`Config.stack_branches`) against float64: four branches of one group, and three (as wide as
    four, the fourth masked) of two groups at stride 2. And with two taps per program
    (`Config.pair_taps`): four branches; three at dilation 2 on an output 16 wide, so the pairs'
    columns (one dilation more than the output's) take a second column of tiles; two at stride 2,
    where pairs do not apply."""
    import torch.nn.functional as F
    from timm_epsanet import _triton_spc as tsp
    from timm_epsanet._triton_branch import mma_config_for
    errors = {}
    stacked = mma_config_for(16, 16)._replace(block_p=16, stack_branches=True)  # one each: SPC_CASES
    paired = mma_config_for(16, 16)._replace(block_p=16, pair_taps=True)
    for name, kernels, groups, stride, dilation, size, config in (
            ('4 branches', (3, 5, 7, 9), 1, 1, 1, (6, 7), stacked),
            ('3 branches, stride 2', (5, 7, 9), 2, 2, 1, (6, 7), stacked),
            ('pairs, 4 branches', (3, 5, 7, 9), 1, 1, 1, (6, 7), paired),
            ('pairs, 3 branches, dilation 2, 16 wide', (5, 7, 9), 2, 1, 2, (5, 16), paired),
            ('pairs, 2 branches, stride 2', (7, 9), 1, 2, 1, (6, 7), paired)):
        x = torch.randn(1, 16 * groups, *size).contiguous(memory_format=torch.channels_last)
        weights = [torch.randn(16 * groups, 16, k, k) / k for k in kernels]
        ref = [w.double().requires_grad_() for w in weights]
        ys = [F.conv2d(x.double(), w, None, stride, dilation * (w.shape[-1] // 2), dilation, groups) for w in ref]
        grad = torch.randn(1, 16 * groups * len(kernels), *ys[0].shape[2:]).contiguous(memory_format=torch.channels_last)
        torch.autograd.backward(ys, list(grad.double().split(16 * groups, 1)))
        got = tsp._launch_weight_grad(x, grad, weights, (stride, stride), (dilation, dilation), groups, config)
        errors[name] = max(rel_err(g, w.grad) for g, w in zip(got, ref))
    return errors


def check_fused_pixel_tiles() -> dict:
    """The fused forward and input gradient on tiles of rows x columns (`Config.tile_w`) instead of
    a run of consecutive pixels, against float64: tiles 2 x 8 on an output 7 x 9 (partial tiles
    on both axes), 8 x 2 at stride 2, 2 x 8 at dilation 2."""
    import torch.nn.functional as F
    from timm_epsanet import _triton_spc as tsp
    from timm_epsanet._triton_branch import mma_config_for
    errors = {}
    for name, kernels, groups, stride, dilation, size, tile_w in (
            ('4 branches', (3, 5, 7, 9), 1, 1, 1, (7, 9), 8),
            ('3 branches, stride 2', (5, 7, 9), 2, 2, 1, (9, 10), 2),
            ('2 branches, dilation 2', (7, 9), 1, 1, 2, (6, 11), 8)):
        x = torch.randn(1, 16 * groups, *size).contiguous(memory_format=torch.channels_last)
        weights = [torch.randn(16 * groups, 16, k, k) / k for k in kernels]
        x_ref = x.double().requires_grad_()
        y_ref = torch.cat([F.conv2d(x_ref, w.double(), None, stride, dilation * (w.shape[-1] // 2), dilation, groups)
                           for w in weights], 1)
        config = mma_config_for(16, 16)._replace(block_p=16, tile_w=tile_w)
        y = torch.empty(y_ref.shape).contiguous(memory_format=torch.channels_last)
        y = tsp._launch(x, weights, y, (stride, stride), (dilation, dilation), groups, False, config=config)
        errors[f'{name}, forward'] = rel_err(y, y_ref)
        if stride == 1:  # the fused input gradient's stride
            grad = torch.randn(y_ref.shape).contiguous(memory_format=torch.channels_last)
            (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad.double())
            gx = tsp._launch(grad, weights, torch.empty_like(x), (1, 1), (dilation, dilation), groups, True, config)
            errors[f'{name}, input gradient'] = rel_err(gx, gx_ref)
    return errors


def check_pipeline_depth() -> dict:
    """The load-pipeline depth each tensor-core kernel is launched with on a tile of `num_stages=1`,
    as the tile sweep's neighbour passes it to the launch functions: kernel name -> depths seen."""
    from timm_epsanet import _triton_branch as tb
    from timm_epsanet import _triton_spc as tsp
    interpreted_function = type(tb._conv_mma_kernel)
    run, seen = interpreted_function.run, {}

    def recording(self, *args, **kwargs):
        seen.setdefault(self.fn.__name__, set()).add(kwargs.get('num_stages'))
        return run(self, *args, **kwargs)

    channels_last = dict(memory_format=torch.channels_last)
    tile = tb.Config(16, 1, 16, 16, num_stages=1)
    interpreted_function.run = recording
    try:
        x, w = torch.randn(1, 16, 4, 4).contiguous(**channels_last), torch.randn(16, 4, 3, 3)
        grad = torch.randn(1, 16, 4, 4).contiguous(**channels_last)
        tb._launch_conv(x, w, torch.empty_like(grad), 4, (1, 1), (1, 1), (1, 1), False, tile, tensor_cores=True)
        tb._launch_conv(grad, w, torch.empty_like(x), 4, (1, 1), (1, 1), (1, 1), True, tile, tensor_cores=True)
        tb._launch_weight_grad(x, grad, w, (1, 1), (1, 1), (1, 1), 4, tile, tensor_cores=True)
        weights = [torch.randn(16, 16, k, k) for k in (3, 5)]  # two branches of one group fused
        grad = torch.randn(1, 32, 4, 4).contiguous(**channels_last)
        tsp._launch(x, weights, torch.empty_like(grad), (1, 1), (1, 1), 1, False, tile)
        tsp._launch(grad, weights, torch.empty_like(x), (1, 1), (1, 1), 1, True, tile)
        tsp._launch_weight_grad(x, grad, weights, (1, 1), (1, 1), 1, tile)
    finally:
        interpreted_function.run = run
    return {name: sorted(depths, key=str) for name, depths in seen.items()}


def interpreter_checks() -> dict:
    """Everything that runs the kernels, by the key of its result."""
    return dict(cases=lambda: {case_id(case, form): check_case(case, form) for form in FORMS for case in CASES},
                spc=lambda: {spc_case_id(case): check_spc_case(case) for case in SPC_CASES},
                spc_nchw_kernels=lambda: check_spc_case(SPC_NCHW_CASE, kernel_layout='nchw'),
                spc_inference=check_spc_inference,
                prep=check_prep,
                double_backward=check_double_backward,
                attention=lambda: {str(i): check_attention(case) for i, case in enumerate(ATTENTION_CASES)},
                ops=check_ops, compile=lambda: {form: check_compile(form) for form in FORMS},
                spc_compile=check_spc_compile,
                wide_weight_grad=check_wide_weight_grad,
                pipeline_depth=check_pipeline_depth,
                stacked_weight_grad=check_stacked_weight_grad,
                fused_pixel_tiles=check_fused_pixel_tiles)


# The checks in two subprocesses run at once (one per core of a 2-core machine), of about equal
# time: about 110 s each on the 2-core Xeon, 215 s in one.
SHARDS = (('cases', 'spc_nchw_kernels', 'spc_inference', 'prep', 'double_backward', 'attention', 'compile',
           'spc_compile', 'wide_weight_grad', 'pipeline_depth'),
          ('spc', 'ops', 'stacked_weight_grad', 'fused_pixel_tiles'))


def interpreter_results(shard: int) -> dict:
    torch.manual_seed(0)
    checks = interpreter_checks()
    return {name: checks[name]() for name in SHARDS[shard]}


@pytest.fixture(scope='module')
def interpreted():
    """Everything that runs the kernels, in subprocesses under TRITON_INTERPRET=1 (`SHARDS`)."""
    pytest.importorskip('triton')
    assert sorted(sum(SHARDS, ())) == sorted(interpreter_checks()), 'each check in one shard'
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    runs = [subprocess.Popen([sys.executable, __file__, str(shard)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for shard in range(len(SHARDS))]
    results = {}
    try:
        for run in runs:
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-4000:]
            results.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        for run in runs:
            run.kill()
    return results


@pytest.mark.parametrize('form', FORMS)
@pytest.mark.parametrize('case', CASES, ids=[case_id(case, '')[1:] for case in CASES])
def test_kernels_equal_grouped_conv(interpreted, case, form):
    """Forward, input gradient and weight gradient equal the grouped conv's (fp32 accumulation:
    fp32 within float summation order; fp16 within the rounding of its output); output and input
    gradient in the input's dtype and memory layout."""
    result = interpreted['cases'][case_id(case, form)]
    assert result['shape_ok'] and result['dtype_ok'] and result['layout_ok'], result
    tol = 1e-5 if case[-1] == 'float32' else 2e-3
    for key in ('out', 'grad_input', 'grad_weight'):
        assert result[key] <= tol, (key, result)  # a NaN fails too


@pytest.mark.parametrize('case', SPC_CASES, ids=spc_case_id)
def test_fused_branches_equal_grouped_convs(interpreted, case):
    """'triton_spc': the branches that read the same merged input slices run in one fused kernel,
    their weight gradients in one and, at stride 1, their input gradient in one; the others alone.
    The concatenated output, the input gradient and every branch's weight gradient equal the
    grouped convs'."""
    result = interpreted['spc'][spc_case_id(case)]
    runs = case[1]
    assert result['runs'] == runs, result
    assert result['kernel_layouts'] == ['channels_last'], result  # an NCHW input converted once
    stride = case[0].get('stride', 1)
    fused = sum(len(run) for run in runs)
    alone = ALONE_ON_TENSOR_CORES.get(spc_case_id(case), 0)
    # in eager mode the kernels run without the custom ops' dispatch layers (compile: the custom ops);
    # at stride 2 each fused branch's input gradient runs alone (by phases of the stride)
    assert result['launches'] == {
        'forward': len(runs), 'grad_input': len(runs) if stride == 1 else 0, 'grad_weight': len(runs),
        'alone_forward': alone, 'alone_grad_input': alone + (fused if stride > 1 else 0),
        'alone_grad_weight': alone, 'custom_op': 0}, result
    assert result['dtype_ok'] and result['layout_ok'], result
    tol = 1e-5 if case[-1] == 'float32' else 2e-3
    for key in ('out', 'grad_input', 'grad_weight'):
        assert result[key] <= tol, (key, result)


def test_fused_kernels_on_nchw_strides(interpreted):
    """The fused kernels also compute the grouped convs on NCHW tensors (`spc_conv` takes any
    strides), though the plans run them on channels-last."""
    result = interpreted['spc_nchw_kernels']
    assert result['kernel_layouts'] == ['nchw'] and result['runs'] == SPC_NCHW_CASE[1], result
    assert result['dtype_ok'] and result['layout_ok'], result
    for key in ('out', 'grad_input', 'grad_weight'):
        assert result[key] <= 1e-5, (key, result)


def test_fused_inference_builds_the_weight_tiles_once_until_the_weight_changes(interpreted):
    """In eval mode without autograd the fused kernels' weight tiles (merged, cast, laid out) are
    built on the first forward and reused, until an in-place update of the weights; every output
    stays right."""
    first, second, updated = interpreted['spc_inference']
    assert (first['built'], second['built'], updated['built']) == (4, 0, 4), interpreted['spc_inference']
    assert all(r['err'] <= 1e-5 for r in (first, second, updated)), interpreted['spc_inference']


@pytest.mark.parametrize('index', range(len(ATTENTION_CASES)))
def test_attention_kernels_equal_the_plain_attention(interpreted, index):
    """PSA's attention on `_triton_attention` (the Triton form of SEWeight, the softmax across scales
    and the reweighting) computes the plain module's output, and the gradients of the input and of
    every parameter, in the input's dtype and layout, in training and in inference."""
    result = interpreted['attention'][str(index)]
    assert result['used'] == [True, True] and result['dtype_ok'] and result['layout_ok'], result
    tol = 1e-5 if ATTENTION_CASES[index][-1] == 'float32' else 3e-3  # fp16: its branches' outputs rounded
    assert max(result['out'], result['infer'], result['grad_input']) <= tol, result  # a NaN fails too
    # each parameter's gradient as close to float64's as the plain module's in fp32, up to summation
    # order: SEWeight's bias gradients sum terms that cancel, so both are off by up to ~1e-5 there
    assert len(result['grad_params']) >= 6, result
    for name, (err, plain_err) in result['grad_params'].items():
        assert err <= 10 * max(tol, plain_err), (name, result)


def test_second_derivatives_through_the_kernels_are_refused(interpreted):
    """The kernels' gradients are not differentiable: a second derivative (create_graph=True) through
    the fused branches or the attention's kernels fails loudly instead of returning wrong values."""
    refused = interpreted['double_backward']
    assert set(refused) == {'branches', 'attention'}, refused
    assert all(message and 'once_differentiable' in message for message in refused.values()), refused


def test_one_launch_weight_preparation_equals_the_custom_ops(interpreted):
    """The eager path builds every branch's kernel tiles, and reads every grouped weight gradient,
    in one launch each: the same tiles as the custom ops lay out from the merged weights (bit for
    bit), the same gradients as the diagonal blocks of the merged weights' partial sums."""
    prep = interpreted['prep']
    assert prep['tiles transposed=False'] and prep['tiles transposed=True'], prep
    assert prep['grads'] <= 1e-6, prep


def test_custom_ops_pass_opcheck(interpreted):
    """Schema, fake tensor (shapes, dtypes, strides), autograd registration, AOT dispatch."""
    assert interpreted['ops'] == {'branch_conv': [], 'grad_input': [], 'grad_weight': [], 'spc_conv': [],
                                  'spc_grad_input': [], 'spc_grad_weight': []}


def test_weight_grad_tiles_of_part_of_a_row(interpreted):
    errors = interpreted['wide_weight_grad']
    assert set(errors) == {'cuda_cores', 'mma', 'mma, 4 taps'} and all(e <= 1e-5 for e in errors.values()), errors


def test_fused_weight_gradient_in_one_product_equals_the_convs(interpreted):
    """The branches that reach a tap multiplied as one product, and two taps per program (the tile
    sweep's alternatives to one product per branch and tap) give every branch's weight gradient,
    those of a masked fourth branch, or of a tap beyond a kernel's reach, excluded."""
    errors = interpreted['stacked_weight_grad']
    assert len(errors) == 5 and all(e <= 1e-5 for e in errors.values()), errors


def test_fused_kernels_on_tiles_of_rows_and_columns_equal_the_convs(interpreted):
    """The fused forward and input gradient on 2D pixel tiles (the tile sweep's alternative to a
    run of consecutive pixels) cover every output pixel once, partial tiles masked."""
    errors = interpreted['fused_pixel_tiles']
    assert len(errors) == 5 and all(e <= 1e-5 for e in errors.values()), errors


def test_a_tiles_load_pipeline_depth_reaches_every_tensor_core_launch(interpreted):
    """A tile's `num_stages` (the tile sweep times 1 and 2 beside Triton's default 3) is what each
    tensor-core kernel, alone and fused, is launched with: else the sweep would time the default
    under another name."""
    assert interpreted['pipeline_depth'] == {name: [1] for name in (
        '_conv_mma_kernel', '_weight_grad_mma_kernel', '_spc_mma_kernel', '_spc_grad_input_mma_kernel',
        '_spc_weight_grad_mma_kernel')}, interpreted['pipeline_depth']


@pytest.mark.parametrize('form', ALL_FORMS)
def test_compile_sees_one_op_without_graph_break(interpreted, form):
    """A branch is one op in torch.compile's graph; so are a PSA's fused branches ('triton_spc')."""
    result = interpreted['spc_compile'] if form == 'triton_spc' else interpreted['compile'][form]
    assert result['graph_breaks'] == 0 and result['ops'] == 1, result
    assert result['loss'] <= 1e-5 and result['grad'] <= 1e-5, result


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """benchmarks/triton_sass.py as a user runs it: every kernel of Small's stage-1 branches builds
    for sm_90 (no GPU needed: triton's own ptxas and cuobjdump) without spilling registers, with
    the shared memory a Hopper block may have, and its innermost loop multiplies on the unit it is written for: tensor cores (Hopper's
    warpgroup MMA) for the tensor-core kernels, fused ones included, FFMA on CUDA cores for the others.
    The fused kernels also build with their loads unpipelined, which then go through L1, the
    forward and input gradient so on 2D pixel tiles, and the fused weight gradient with its
    branches in one product, and with its taps in pairs."""
    pytest.importorskip('triton')
    import triton
    if not (Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'cuobjdump').exists():
        pytest.skip('triton without its CUDA backend')
    out = tmp_path / 'sass.json'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    run = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'triton_sass.py'), '--stages', '1', '--json', str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(out.read_text())['rows']
    assert len(rows) == 3 * 6 + 3  # three branches, three kernels on each unit; the fused kernels
    assert [row['kernel'] for row in rows[-3:]] == ['spc forward', 'spc grad_input', 'spc grad_weight']
    for row in rows:
        assert row['spill_bytes'] == 0, row
        assert row['blocks_per_sm'] >= 1, row  # its shared memory fits a block: the launch would fail
        tensor_cores = row['kernel'].startswith(('mma', 'spc'))
        assert (row['mma_macs'] > 0) == tensor_cores and (row['ffma'] > 0) != tensor_cores, row
        assert 0 < row['issue_bound'] <= 1, row
        # the tensor-core kernels' tap loads, pipelined by default: asynchronous copies past L1
        assert row['tap_loads'] == ('L2' if tensor_cores else 'L1'), row
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    try:
        from triton_sass import KERNELS, build_spc_sm90, build_sm90, fused_loop, resources
    finally:
        sys.path.remove(str(ROOT / 'benchmarks'))
    from timm_epsanet._triton_branch import mma_config_for
    for kind in ('forward', 'grad_input', 'grad_weight'):  # the tile sweep's first neighbour: loads through L1
        cfg, report, sass, shared = build_spc_sm90(kind, 'fp16', (3, 5, 7, 9), 64, 16, num_stages=1)
        built = resources(report, shared, cfg.num_warps)
        assert built['spill_bytes'] == 0 and built['blocks_per_sm'] >= 1, (kind, built)
        assert fused_loop(sass, cfg.num_warps)['tap_loads'] == 'L1', kind
        if kind != 'grad_weight':  # and on tiles of 16 x 8 pixels
            cfg = cfg._replace(tile_w=8)
            cfg, report, sass, shared = build_spc_sm90(kind, 'fp16', (3, 5, 7, 9), 64, 16, config=cfg)
            built = resources(report, shared, cfg.num_warps)
            assert built['spill_bytes'] == 0 and built['blocks_per_sm'] >= 1, (kind, built)
            assert fused_loop(sass, cfg.num_warps)['tap_loads'] == 'L1', kind
    # and its weight gradient with the branches reaching a tap in one product, as wide as all four
    cfg = mma_config_for(64, 16)._replace(stack_branches=True)
    cfg, report, sass, shared = build_spc_sm90('grad_weight', 'fp16', (3, 5, 7, 9), 64, 16, config=cfg)
    built = resources(report, shared, cfg.num_warps)
    assert built['spill_bytes'] == 0 and built['blocks_per_sm'] >= 1, built
    assert 'HGMMA.64x64x16' in sass, 'one product of the 4 x 16 outputs of the taps all branches reach'
    # and with its taps in pairs through L1, as the tile sweep times it: two such products per input tile
    cfg = mma_config_for(64, 16)._replace(pair_taps=True, num_stages=1)
    cfg, report, sass, shared = build_spc_sm90('grad_weight', 'fp16', (3, 5, 7, 9), 64, 16, config=cfg)
    built = resources(report, shared, cfg.num_warps)
    assert built['spill_bytes'] == 0 and built['blocks_per_sm'] >= 2, built
    loop = fused_loop(sass, cfg.num_warps)
    assert loop['tap_loads'] == 'L1' and loop['mma_macs'] == 2 * 64 * 64 * 128, loop
    from timm_epsanet import _triton_spc
    from triton_sass import _build
    prep = dict(K0=3, K1=5, K2=7, K3=9, M0=1, M1=4, M2=8, M3=16, C_IN=64, C_OUT=16, BLOCK=_triton_spc.PREP_BLOCK)
    for kernel, consts in ((_triton_spc._tiles_kernel, dict(prep, TRANSPOSED=False)),
                           (_triton_spc._tiles_kernel, dict(prep, TRANSPOSED=True)),
                           (_triton_spc._weight_grads_kernel, prep)):  # the training step's weight preparation
        report, _, shared = _build(kernel, 'fp16', consts, 4)
        built = resources(report, shared, 4)
        assert built['spill_bytes'] == 0 and built['blocks_per_sm'] >= 1, (kernel, built)
    from timm_epsanet import _triton_attention
    from timm_epsanet.psa import PyramidSqueezeAttention
    for chs in (512, 1024):  # the attention's kernels, for Small's and Large's widest PSAs (C' 128 and 256)
        s, c, r, s_p, r_p, block_c = _triton_attention._sizes(4, PyramidSqueezeAttention(chs).se.fc1.weight)
        consts = dict(S=s, C=c, R=r, S_P=s_p, R_P=r_p, BLOCK_C=block_c)
        for kernel in (_triton_attention._gate_kernel, _triton_attention._gate_grad_kernel):
            report, _, shared = _build(kernel, 'fp32', consts, 4, types={'inv_hw': 'fp32'})
            built = resources(report, shared, 4)
            assert built['spill_bytes'] == 0 and built['blocks_per_sm'] >= 1, (kernel, chs, built)
    for name in ('grad_input', 'mma grad_input'):  # a strided conv's input gradient, by phases
        kernel, _, transposed = KERNELS[name]
        shape = (64, 16, 1) if name.startswith('mma') else (16, 4, 4)
        cfg, report, _, shared = build_sm90(kernel, 'fp16', *shape, transposed, phased=True)
        built = resources(report, shared, cfg.num_warps)
        assert built['spill_bytes'] == 0 and built['blocks_per_sm'] >= 1, (name, built)


def test_cuda_rule_with_triton_runs_tensor_cores():
    """'auto' on CUDA with the Triton kernels asked for: every grouped branch on the tensor-core
    kernels, fused where branches share input slices; a depthwise branch on cuDNN."""
    from timm_epsanet._branch_plans import cuda_branch_form
    for training in (False, True):
        for groups, in_per_group in ((16, 4), (4, 16), (4, 32), (32, 4)):
            for out_channels, stride in ((16, 1), (128, 2)):
                form = cuda_branch_form(groups, training, in_per_group, True, out_channels, stride)
                assert form == 'triton_spc', (groups, in_per_group, out_channels, stride)
        assert not cuda_branch_form(64, training, 1, True, 64).startswith('triton')


@pytest.mark.parametrize('training', [False, True])
def test_cuda_rule_without_triton_takes_the_faster_cudnn_form_per_branch(monkeypatch, training):
    """'auto' on CUDA without the Triton kernels, per branch of epsanet50_small's PSAs (groups 4,
    8, 16 of kernels 5, 7, 9): the dense form where an H200 timed it faster than cuDNN's grouped
    conv (stages 1 and 2, stage 3's branches of 8 or fewer outputs per group), the grouped conv
    where that was faster (stage 4's branches of 128 outputs, stage 3's kernel 5 of 16 outputs per
    group), and in training at stride 2, where the dense backward made the whole model train
    slower (benchmarks/README.md, "The cuDNN forms"). Large's 32 groups stay grouped."""
    from timm_epsanet import _branch_conv
    from timm_epsanet.psa import PyramidSqueezeAttention
    monkeypatch.setattr(_branch_conv, 'triton_in_auto', lambda: False)

    def forms(width, stride=1, groups=(1, 4, 8, 16)):
        return [c.plan_for('cuda', training)[0] for c in PyramidSqueezeAttention(width, stride=stride, groups=groups).convs[1:]]
    assert forms(64) == ['dense'] * 3
    assert forms(128) == ['dense'] * 3
    assert forms(256) == ['grouped', 'dense', 'dense']
    assert forms(512) == ['grouped'] * 3
    assert forms(128, stride=2) == (['grouped'] * 3 if training else ['dense'] * 3)
    assert forms(256, stride=2) == (['grouped'] * 3 if training else ['grouped', 'dense', 'dense'])
    assert forms(256, groups=(32, 32, 32, 32)) == ['grouped'] * 3


@pytest.mark.parametrize('form', ALL_FORMS)
def test_triton_form_plans(monkeypatch, form):
    """The Triton forms: CPU plans identical to 'auto' (the kernels need CUDA), the grouped conv on
    other devices; on CUDA in channels-last, the layout the kernels load as vectors (cuDNN's forms
    in the caller's); 'auto' on CUDA takes the tensor-core kernels only where triton runs on CUDA."""
    from timm_epsanet import _branch_conv
    from timm_epsanet.psa import PyramidSqueezeAttention

    for width, stride in ((64, 1), (128, 1), (128, 2), (512, 1)):
        auto = PyramidSqueezeAttention(width, stride=stride).convs
        tri = PyramidSqueezeAttention(width, stride=stride, branch_form=form).convs
        for a, t in zip(auto, tri):
            assert a.cpu_plans == t.cpu_plans
            assert (a.group_sum_weight is None) == (t.group_sum_weight is None)
    small = PyramidSqueezeAttention(64, branch_form=form).convs  # groups 1, 4, 8, 16
    assert [c.plan_for('cuda', True) for c in small] == [('grouped', 'any')] + [(form, 'channels_last')] * 3
    assert [c.plan_for('mps', False)[0] for c in small] == ['grouped'] * 4
    auto = PyramidSqueezeAttention(512).convs  # 32, 16, 8 outputs per group for groups 4, 8, 16
    monkeypatch.setattr(_branch_conv, 'triton_in_auto', lambda: True)
    assert [c.plan_for('cuda', False) for c in auto] == [('grouped', 'any')] + [('triton_spc', 'channels_last')] * 3
    monkeypatch.setattr(_branch_conv, 'triton_in_auto', lambda: False)
    assert [c.plan_for('cuda', False) for c in auto] == [('grouped', 'any')] * 4


def test_tensor_core_form_merges_groups_to_sixteen_outputs():
    """'triton_mma' merges the fewest adjacent groups that give each merged group 16 outputs
    (`tl.dot`'s smallest tile): Small's stage-1 branches, 4, 2 and 1 outputs per group, merge
    4, 8 and 16 groups; groups of 16 or more outputs stay as they are."""
    from timm_epsanet.psa import PyramidSqueezeAttention
    assert [c.mma_regroup for c in PyramidSqueezeAttention(64).convs] == [1, 4, 8, 16]
    assert [c.mma_regroup for c in PyramidSqueezeAttention(512).convs] == [1, 1, 1, 2]


@pytest.mark.parametrize('variant', ['epsanet50_small', 'epsanet50_large'])
def test_fused_runs_of_the_variants(variant):
    """Which of EPSANet's branches 'triton_spc' computes together, per PSA: in Large all four
    (every branch merges into the same 64-channel input slices); in Small those of kernels 5-9,
    except at the last stage, where kernel 5's groups (32 outputs) need no merge and read wider
    slices, so kernels 7 and 9 fuse and 5 runs alone. Small's kernel-3 branch, a dense conv, joins
    them at stage 1, where it reads the same 64 channels; elsewhere it is cuDNN's."""
    pytest.importorskip('triton')
    import timm
    from timm_epsanet.psa import PyramidSqueezeAttention

    model = timm.create_model(variant, device='meta', block_args=dict(psa_branch_form='triton_spc'))
    runs = []
    for psa in (m for m in model.modules() if isinstance(m, PyramidSqueezeAttention)):
        plans = [conv.plan_for('cuda', True) for conv in psa.convs]
        runs.append(psa.convs.spc_runs(plans, ['channels_last'] * len(plans)))
    blocks = (3, 4, 6, 3)
    if variant.endswith('large'):
        assert runs == [[[0, 1, 2, 3]]] * sum(blocks)
    else:
        assert runs == [[[0, 1, 2, 3]]] * blocks[0] + [[[1, 2, 3]]] * sum(blocks[1:3]) + [[[2, 3]]] * blocks[3]


def test_fused_runs_follow_the_plan_of_each_call():
    """The fused runs are kept per plan (every eager call asks): a PSA whose plan changes between
    calls (branch tuning, a layout the caller switches) fuses what each call's plan says."""
    pytest.importorskip('triton')
    from timm_epsanet.psa import PyramidSqueezeAttention

    convs = PyramidSqueezeAttention(64).convs  # Small's stage 1: all four fuse
    fused = [('triton_spc', 'channels_last')] * 4
    one_nchw = fused[:1] + [('triton_spc', 'nchw')] + fused[2:]
    calls = [(fused, ['channels_last'] * 4, [[0, 1, 2, 3]]),
             (fused[:2] + [('grouped', 'channels_last')] * 2, ['channels_last'] * 4, [[0, 1]]),
             (one_nchw, ['channels_last', 'nchw', 'channels_last', 'channels_last'], [[0, 2, 3]]),
             ([('grouped', 'channels_last')] * 4, ['channels_last'] * 4, [])]
    for _ in range(2):  # each plan again, after the others
        for plans, layouts, expected in calls:
            assert convs.spc_runs(plans, layouts) == expected
    convs.spc_runs(fused, ['channels_last'] * 4)[0].append(9)  # what a caller does with the answer stays its own
    assert convs.spc_runs(fused, ['channels_last'] * 4) == [[0, 1, 2, 3]]


@pytest.mark.parametrize('hook', ['forward_pre', 'forward', 'global'])
def test_a_hooked_branch_is_not_fused(hook):
    """A fused run computes its branches in one call, past their module calls: while a hook would
    see a branch's call (pruning's pre-hook sets the weight, counters read the output), no branch
    is fused, and each runs as a module; without it they fuse again."""
    pytest.importorskip('triton')
    from timm_epsanet.psa import PyramidSqueezeAttention

    convs = PyramidSqueezeAttention(64).convs  # Small's stage 1: all four fuse
    fused, layouts = [('triton_spc', 'channels_last')] * 4, ['channels_last'] * 4
    assert convs.spc_runs(fused, layouts) == [[0, 1, 2, 3]]
    noop = (lambda *args: None)
    handle = (convs[2].register_forward_pre_hook(noop) if hook == 'forward_pre'
              else convs[2].register_forward_hook(noop) if hook == 'forward'
              else nn.modules.module.register_module_forward_hook(noop))
    try:
        assert convs.spc_runs(fused, layouts) == []
    finally:
        handle.remove()
    assert convs.spc_runs(fused, layouts) == [[0, 1, 2, 3]]

@pytest.mark.parametrize('hook', ['se', 'fc1', 'global'])
def test_a_hooked_seweight_is_not_fused(hook):
    """The attention's kernels compute SEWeight past its modules' calls: while a hook would see one
    (on SEWeight, on one of its layers, or on every module), PSA runs its plain attention instead."""
    pytest.importorskip('triton')
    from timm_epsanet._triton_attention import fusable
    from timm_epsanet.psa import PyramidSqueezeAttention

    se = PyramidSqueezeAttention(64).se
    assert fusable(se)
    noop = (lambda *args: None)
    handle = (se.register_forward_hook(noop) if hook == 'se' else se.fc1.register_forward_pre_hook(noop)
              if hook == 'fc1' else nn.modules.module.register_module_forward_hook(noop))
    try:
        assert not fusable(se)
    finally:
        handle.remove()
    assert fusable(se)


def test_auto_takes_triton_only_when_asked(monkeypatch):
    """Unmeasured on a GPU, the kernels are opt-in for 'auto': off unless TIMM_EPSANET_TRITON=1 (the
    branches' and the attention's) or =attention (the attention's alone), and never where triton
    cannot run on CUDA. Any other value warns, naming the values it takes, and keeps them off."""
    from timm_epsanet import _branch_plans
    monkeypatch.setattr(_branch_plans, 'triton_runs_on_cuda', lambda: True)
    monkeypatch.setattr(_branch_plans, 'TRITON_IN_AUTO', False)
    assert not _branch_plans.triton_in_auto() and not _branch_plans.triton_attention_in_auto()
    monkeypatch.setattr(_branch_plans, 'TRITON_ATTENTION_IN_AUTO', True)
    assert not _branch_plans.triton_in_auto() and _branch_plans.triton_attention_in_auto()
    monkeypatch.setattr(_branch_plans, 'TRITON_ATTENTION_IN_AUTO', False)
    monkeypatch.setattr(_branch_plans, 'TRITON_IN_AUTO', True)
    assert _branch_plans.triton_in_auto() and _branch_plans.triton_attention_in_auto()
    monkeypatch.setattr(_branch_plans, 'triton_runs_on_cuda', lambda: False)
    assert not _branch_plans.triton_in_auto() and not _branch_plans.triton_attention_in_auto()
    code = 'from timm_epsanet import _branch_plans as p; print(p.TRITON_IN_AUTO, p.TRITON_ATTENTION_IN_AUTO)'
    for value, expected in (('', 'False False'), ('1', 'True False'), ('0', 'False False'),
                            ('attention', 'False True'), (' On', 'True False'), ('fast', 'False False')):
        env = dict(os.environ, TIMM_EPSANET_TRITON=value)
        out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
        assert ("TIMM_EPSANET_TRITON='fast' is not one of" in out.stderr) == (value == 'fast'), out.stderr


@pytest.mark.parametrize('form', ALL_FORMS)
def test_cpu_use_never_imports_the_kernels(form):
    """On CPU the Triton forms compute as 'auto' (a model, also scripted, or a branch on its own):
    they neither import the kernel module nor need triton."""
    code = ("import sys; sys.modules['triton'] = None\n"  # as if triton were not installed
            "import torch, timm, timm_epsanet\n"
            f"m = timm.create_model('epsanet50_small', block_args=dict(psa_branch_form='{form}'))\n"
            "x = torch.randn(2, 3, 32, 32)\n"
            "m(x).sum().backward()\n"
            "torch.testing.assert_close(torch.jit.script(m.eval())(x), m(x))\n"
            "from timm_epsanet._branch_conv import BranchConv2d\n"  # a branch on its own, too
            f"conv = BranchConv2d(16, 8, 5, padding=2, groups=4, bias=False, form='{form}')\n"
            "x = torch.randn(2, 16, 9, 9)\n"
            "torch.testing.assert_close(conv(x), conv.forward_as(x, 'grouped'))\n"
            "assert 'timm_epsanet._triton_branch' not in sys.modules\n"
            "assert 'timm_epsanet._triton_spc' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    run = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]


if __name__ == '__main__':
    if os.environ.get('TRITON_INTERPRET') != '1':
        sys.exit('run with TRITON_INTERPRET=1: the kernels then run on CPU tensors')
    results = {}  # one shard (as the `interpreted` fixture runs them), or all
    for shard in [int(sys.argv[1])] if len(sys.argv) > 1 else range(len(SHARDS)):
        results.update(interpreter_results(shard))
    print(json.dumps(results))


def test_fused_branches_refuse_an_input_of_another_dtype_than_their_weights():
    """As a conv does, outside autocast: fp16 input into fp32 weights is an error that says so
    (not a silent cast), raised before any kernel runs."""
    pytest.importorskip('triton')
    from timm_epsanet.psa import PyramidSqueezeAttention

    convs = PyramidSqueezeAttention(32, groups=(8, 8, 8, 8), branch_form='triton_spc').convs
    plans = [conv.plan_for('cuda', True) for conv in convs]
    x = torch.randn(2, 32, 5, 6).half().contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match='the input is torch.float16 but the weights are torch.float32'):
        convs.run_plans(x, plans)
