"""Correctness checks that need a CUDA GPU (CI has none; the CPU test suite covers the rest).

    python benchmarks/cuda_checks.py [forms] [fused] [attention] [cpu] [grads] [compile]     # default: all
    TRITON_INTERPRET=1 python benchmarks/cuda_checks.py --device cpu --tiny   # dry run of the code paths

1. forms: every branch form (grouped, depthwise, volumetric, dense, regrouped, triton, triton_mma)
   against the plain grouped conv computed in float64: forward, input gradient and weight
   gradient, for every EPSANet branch shape (Small and Large, stride 1 and 2, dilation 2) in fp16
   channels-last, and for a few shapes in fp32, fp16 and bf16, NCHW and channels-last. A form
   passes when its error is within its dtype's tolerance or within 3x the plain grouped conv's own
   error. ('triton_spc' alone is 'triton_mma': see fused.)
2. fused: 'triton_spc', every EPSANet PSA's branches (Small and Large, every stage, stride 1 and 2,
   dilation 2) with the fused kernels of `_triton_spc`, against the float64 grouped convs: the
   concatenated output, the input gradient and every branch's weight gradient, fp16 channels-last.
3. attention: every EPSANet PSA whole, its attention on the Triton kernels of `_triton_attention`,
   AMP fp16, against the float64 module: output, input gradient, SEWeight's gradients.
4. cpu: CUDA fp32 logits (the default forms, the Triton kernels where triton runs) equal the CPU's.
5. grads: AMP (fp16) gradients of every PSA branch form equal fp32's within fp16 noise, and
   parameter gradients stay fp32.
6. compile: torch.compile (inductor) of epsanet50_small, AMP fp16, channels-last: no graph break
   and the Triton ops in the graphs (as the compile that is timed records them: one trace, where
   torch._dynamo.explain would add another), the first call's time, logits equal to eager;
   compiled and eager inference timed side by side.
Prints one line per check and exits non-zero if any fails. TF32 is off throughout.
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

import timm
import timm_epsanet  # noqa: F401
from timm_epsanet._branch_conv import BRANCH_FORMS, BranchConv2d
from timm_epsanet._branch_plans import in_layout

from psa_branches import shapes as branch_shapes, time_ms

FORMS = BRANCH_FORMS[1:]
BRANCH_ALONE_FORMS = tuple(form for form in FORMS if form != 'triton_spc')  # 'triton_spc' alone is 'triton_mma'
# float64-referenced relative error a correct form stays under, per dtype (fp32 accumulation)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model(name='epsanet50_small', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, zero_init_last=False, **kwargs).eval()


def conv_cases(tiny):
    """(description, in_chs, out_chs, kernel, groups, stride, dilation, input size) of EPSANet's
    branches with more than one group: every stage at stride 1, the strided first block of
    stages 2-4, and dilation 2 (output stride 16/8) on the last two stages (sorted by stride + dilation)."""
    if tiny:
        yield 'tiny k5 g4', 16, 8, 5, 4, 1, 1, 9
        yield 'tiny k9 g16 s2', 32, 16, 9, 16, 2, 1, 10
        yield 'tiny k7 g8 d2', 32, 16, 7, 8, 1, 2, 9
        return
    for s in branch_shapes(('small', 'large')):
        if s['groups'] == 1:
            continue
        name = f'{s["variant"]} stage {s["stage"]} k{s["kernel"]} g{s["groups"]}'
        yield name, s['chs'], s['chs'] // 4, s['kernel'], s['groups'], 1, 1, s['size']
        if s['stage'] > 1:
            yield name + ' s2', s['chs'], s['chs'] // 4, s['kernel'], s['groups'], 2, 1, 2 * s['size']
        if s['stage'] > 2:
            yield name + ' d2', s['chs'], s['chs'] // 4, s['kernel'], s['groups'], 1, 2, s['size']


def check_forms(device, tiny, check):
    """Every form against the float64 grouped conv: all shapes fp16 channels-last; three in
    every dtype and layout."""
    # stride 1 first, then every dtype and layout on three shapes, then strided and dilated shapes:
    # the most used first, for a run cut short (each new shape compiles the Triton kernels)
    cases = sorted(conv_cases(tiny), key=lambda case: case[5] + case[6])
    # the interpreter (CPU dry run) has no 16-bit arithmetic
    dtypes = (torch.float16, torch.float32, torch.bfloat16) if device.type == 'cuda' else (torch.float32,)
    plain = [case for case in cases if case[5] == case[6] == 1]
    runs = [(case, dtypes[0], 'channels_last') for case in plain]
    for case in (plain[0], plain[len(plain) // 2], cases[-1]):
        runs += [(case, dtype, layout) for dtype in dtypes for layout in ('nchw', 'channels_last')
                 if (dtype, layout) != (dtypes[0], 'channels_last')]
    runs += [(case, dtypes[0], 'channels_last') for case in cases if case not in plain]
    for (name, in_chs, out_chs, k, groups, stride, dilation, size), dtype, layout in runs:
        torch.manual_seed(0)
        x = in_layout(torch.randn(2, in_chs, size, size, device=device), layout).to(dtype)
        conv = BranchConv2d(in_chs, out_chs, k, stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation,
                            groups=groups, bias=False, form='grouped', device=device)
        weight = conv.weight.detach().to(dtype)
        x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
        y64 = F.conv2d(x64, w64, None, stride, conv.padding, dilation, groups)
        grad = torch.randn_like(y64)
        y64.backward(grad)
        errors = {}
        for form in BRANCH_ALONE_FORMS:
            if form.startswith('triton') and device.type == 'cpu' and not tiny:
                continue
            with torch.no_grad():
                conv.weight.copy_(weight)
            conv.to(dtype)
            xf = x.clone().requires_grad_()
            y = conv.forward_as(xf, form)
            y.backward(grad.to(dtype))
            layout_ok = y.dtype == dtype and y.is_contiguous(
                memory_format=torch.channels_last if layout == 'channels_last' else torch.contiguous_format)
            errors[form] = (rel_err(y, y64), rel_err(xf.grad, x64.grad), rel_err(conv.weight.grad, w64.grad), layout_ok)
            conv.weight.grad = None
        plain = errors['grouped']
        for form, errs in errors.items():
            tol = [max(TOLERANCE[dtype], 3 * e) for e in plain[:3]]
            ok = errs[3] and all(e == e and e <= t for e, t in zip(errs[:3], tol))  # NaN fails
            check(f'{form:<10} {name} {str(dtype)[6:]} {layout}: out {errs[0]:.1e} grad_x {errs[1]:.1e} '
                  f'grad_w {errs[2]:.1e} (grouped {plain[0]:.1e} {plain[1]:.1e} {plain[2]:.1e})'
                  + ('' if errs[3] else ' WRONG DTYPE/LAYOUT'), ok)


def psa_cases(tiny):
    """(description, PSA arguments, input size) of every EPSANet PSA: Small and Large, each stage
    at stride 1, the strided first block of stages 2-4, dilation 2 on the last two stages."""
    if tiny:
        yield 'tiny small-like', dict(in_chs=64), 7
        yield 'tiny large-like d2', dict(in_chs=32, groups=(8,) * 4, dilation=2), 7
        yield 'tiny small-like s2', dict(in_chs=64, stride=2), 8
        return
    for variant, base, groups in (('small', 64, (1, 4, 8, 16)), ('large', 128, (32,) * 4)):
        for stage in range(1, 5):
            chs, size = base << (stage - 1), 56 >> (stage - 1)
            yield f'{variant} stage {stage}', dict(in_chs=chs, groups=groups), size
            if stage > 1:
                yield f'{variant} stage {stage} s2', dict(in_chs=chs, groups=groups, stride=2), 2 * size
            if stage > 2:
                yield f'{variant} stage {stage} d2', dict(in_chs=chs, groups=groups, dilation=2), size


def check_fused(device, tiny, check):
    """'triton_spc' on every EPSANet PSA against the float64 grouped convs (fp16 channels-last;
    the interpreter, fp32)."""
    from timm_epsanet.psa import PyramidSqueezeAttention
    dtype = torch.float16 if device.type == 'cuda' else torch.float32
    for name, kwargs, size in psa_cases(tiny):
        torch.manual_seed(0)
        reference = PyramidSqueezeAttention(**kwargs, branch_form='grouped').convs.to(device, torch.float64)
        convs = PyramidSqueezeAttention(**kwargs, branch_form='triton_spc').convs.to(device, dtype)
        convs.load_state_dict(reference.state_dict())
        x = torch.randn(2, kwargs['in_chs'], size, size, device=device).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        x64, xf = x.double().requires_grad_(), x.clone().requires_grad_()
        y64 = reference(x64)
        grad = torch.randn_like(y64)
        y64.backward(grad)
        plans = [conv.plan_for('cuda', True) for conv in convs]  # the fused kernels' plans, also on a dry run
        runs = convs.spc_runs(plans, ['channels_last'] * len(plans))
        y = convs.run_plans(xf, plans)
        y.backward(grad.to(dtype))
        errs = (rel_err(y, y64), rel_err(xf.grad, x64.grad),
                max(rel_err(c.weight.grad, r.weight.grad) for c, r in zip(convs, reference)))
        layout_ok = y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        check(f'triton_spc {name} {str(dtype)[6:]}: fused {runs}: out {errs[0]:.1e} grad_x {errs[1]:.1e} '
              f'grad_w {errs[2]:.1e}' + ('' if layout_ok else ' WRONG DTYPE/LAYOUT'),
              bool(runs) and layout_ok and all(e == e and e <= TOLERANCE[dtype] for e in errs))


def check_attention(device, tiny, check):
    """Every EPSANet PSA whole, with its attention on `_triton_attention` (as it runs with the branches'
    Triton kernels), under AMP fp16 with fp32 weights as the models run, against the float64 module:
    output and input gradient within 3x the larger of fp16's tolerance and the plain module's own
    AMP error; every SEWeight parameter's gradient within 10x (its bias gradients sum terms that
    cancel, so summation order alone moves them more). The dry run (interpreter, fp32) takes the
    attention's kernels as CUDA would."""
    from timm_epsanet import _triton_attention
    from timm_epsanet.psa import PyramidSqueezeAttention
    cuda = device.type == 'cuda'
    dtype = torch.float16 if cuda else torch.float32
    on_triton, used = PyramidSqueezeAttention._attention_on_triton, []

    def watched(self, x):
        used.append(on_triton(self, x) if cuda else _triton_attention.fusable(self.se))
        return used[-1]

    PyramidSqueezeAttention._attention_on_triton = watched
    try:
        for name, kwargs, size in psa_cases(tiny):
            torch.manual_seed(0)
            reference = PyramidSqueezeAttention(**kwargs, branch_form='grouped').to(device, torch.float64)
            reference.se.fc1.bias.data.uniform_(0.5, 1.0)  # every hidden feature alive: a dead ReLU has no gradient
            x = torch.randn(2, kwargs['in_chs'], size, size, device=device).contiguous(memory_format=torch.channels_last)
            x64 = x.double().requires_grad_()
            y64 = reference(x64)
            grad = torch.randn_like(y64)
            y64.backward(grad)
            errors = {}
            for form in ('grouped', 'triton_spc'):  # the plain module, then the Triton one
                psa = PyramidSqueezeAttention(**kwargs, branch_form=form).to(device)
                psa.load_state_dict(reference.state_dict())
                xf = x.clone().requires_grad_()
                used.clear()
                with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                    y = psa(xf)
                y.backward(grad.to(y.dtype))
                errors[form] = [rel_err(y, y64), rel_err(xf.grad, x64.grad)] + [
                    rel_err(p.grad, r.grad) for p, r in zip(psa.se.parameters(), reference.se.parameters())]
            ok = used == [True] and all(e == e and e <= (3 if i < 2 else 10) * max(TOLERANCE[dtype], plain)
                                        for i, (e, plain) in enumerate(zip(errors['triton_spc'], errors['grouped'])))
            fused = errors['triton_spc']
            check(f'attention on triton, {name} {str(dtype)[6:]}: out {fused[0]:.1e} grad_x {fused[1]:.1e} '
                  f'grad_se {max(fused[2:]):.1e} (plain {max(errors["grouped"][2:]):.1e})'
                  + ('' if used == [True] else ' NOT ON TRITON'), ok)
    finally:
        PyramidSqueezeAttention._attention_on_triton = on_triton


def check_cpu(device, tiny, check):
    x = torch.randn(2 if tiny else 4, 3, 64 if tiny else 224, 64 if tiny else 224)
    for name in ('epsanet50_small', 'epsanet50_large'):
        m = model(name)
        with torch.no_grad():
            cpu = m(x)
            gpu = m.to(device)(x.to(device)).cpu()
        err = rel_err(gpu, cpu)
        check(f'{name} {device.type} fp32 logits == CPU: {err:.1e}', err <= 1e-4)


def check_grads(device, tiny, check):
    # eval mode (BN affine): in train mode, BN over a tiny batch amplifies any rounding difference.
    # Tiny: 128x128, not 64x64, where stage 4 is 2x2 and oneDNN's bf16 weight gradient of a dense
    # conv with a 7x7 or 9x9 kernel on an input smaller than about half the kernel is wrong
    # (torch 2.11 and 2.14 on CPU: 'dense' failed at random; benchmarks/README.md)
    torch.manual_seed(0)
    size = 128 if tiny else 224
    x = torch.randn(2 if tiny else 4, 3, size, size, device=device)
    amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    grads = {}
    for form, amp in [('grouped', False), ('grouped', True)] + [(f, True) for f in FORMS if f != 'grouped']:
        m = model(block_args=dict(psa_branch_form=form)).to(device, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = m(x.contiguous(memory_format=torch.channels_last)).float().logsumexp(1).mean()
        loss.backward()
        dtypes_ok = all(p.grad.dtype == torch.float32 for p in m.parameters())
        grads[form, amp] = (torch.cat([p.grad.flatten() for p in m.parameters()]), dtypes_ok)
    # rounding alone moves these gradients by a few percent; a form is right when it stays within
    # that noise of the plain grouped conv's AMP error
    amp_noise = rel_err(grads['grouped', True][0], grads['grouped', False][0])
    check(f'AMP gradients, grouped form, vs fp32: {amp_noise:.1e}', amp_noise <= 1e-1)
    for form in FORMS[1:]:
        err = rel_err(grads[form, True][0], grads['grouped', False][0])
        check(f'AMP gradients, {form} form, vs fp32: {err:.1e} (fp32 parameter gradients: {grads[form, True][1]})',
              err <= 1.5 * amp_noise and grads[form, True][1])


def check_compile(device, tiny, check):
    cuda = device.type == 'cuda'
    batch, size = (2, 64) if tiny else (128, 224)
    m = model().to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    amp = dict(device_type=device.type, dtype=torch.float16 if cuda else torch.bfloat16)
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx
    graphs = []

    def inductor_recording_graphs(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    # one trace, by the compile that is timed (torch._dynamo.explain would trace the model again)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, backend=inductor_recording_graphs)
    with torch.no_grad(), torch.autocast(**amp):
        start = time.perf_counter()
        comp = compiled(x)
        if cuda:
            torch.cuda.synchronize()
        breaks = max(len(graphs) - 1, sum(counters['graph_break'].values()))
        ops = sum(g.code.count('torch.ops.timm_epsanet.') for g in graphs)
        check(f'torch.compile: {breaks} graph breaks, {ops} Triton ops in the graph', breaks == 0 and (ops > 0 or not cuda))
        # said as soon as known: the timings below may not fit in a GPU stage's time limit
        check(f'torch.compile first call (compiling the model): {time.perf_counter() - start:.0f} s', True)
        eager = m(x)
        err = rel_err(comp, eager)
        check(f'torch.compile logits == eager (AMP, channels_last): {err:.1e}', err <= 1e-2)
        for name, fn in (('eager', m), ('compiled', compiled)):
            ms = time_ms(lambda: fn(x), device, 3 if tiny else 20, warmup=1)
            check(f'{name} inference, batch {batch}: {1e3 * batch / ms:.0f} img/s', True)


CHECKS = {'forms': check_forms, 'fused': check_fused, 'attention': check_attention, 'cpu': check_cpu,
          'grads': check_grads, 'compile': check_compile}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checks', nargs='*', choices=[[]] + list(CHECKS), help='default: all')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true', help='tiny shapes: a dry run of every code path')
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    print(f'{name}, torch {torch.__version__}, timm {timm.__version__}', flush=True)
    failed = []

    def check(line, ok):
        print(f'{"PASS" if ok else "FAIL"} {line}', flush=True)
        if not ok:
            failed.append(line)

    for name in args.checks or list(CHECKS):
        if name == 'cpu' and device.type == 'cpu':
            continue
        try:
            CHECKS[name](device, args.tiny, check)
        except Exception as e:  # one broken check must not hide the others' results
            check(f'{name}: {type(e).__name__}: {e}'.splitlines()[0][:300], False)
    print(f'{len(failed)} failed' if failed else 'all passed', flush=True)
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
