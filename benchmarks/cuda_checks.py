"""Correctness checks that need a CUDA GPU (CI has none; the CPU test suite covers the rest).

    python benchmarks/cuda_checks.py [cpu] [grads] [compile]     # default: all

1. CUDA fp32 logits equal the CPU's (TF32 off).
2. AMP (fp16) gradients of every PSA branch form (the depthwise form runs a custom autograd
   function) are those of fp32, and parameter gradients stay fp32.
3. torch.compile (inductor, CUDA) gives eager's logits, fp32 and AMP, channels_last.
Prints one line per check and exits non-zero if any fails.
"""
import sys

import torch

import timm
import timm_epsanet  # noqa: F401


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def model(name='epsanet50_small', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, zero_init_last=False, **kwargs).eval()


def main():
    checks = sys.argv[1:] or ['cpu', 'grads', 'compile']
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.device('cuda')
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}')
    failed = []

    def check(name, err, tol):
        ok = err == err and err <= tol  # NaN fails
        print(f'{"PASS" if ok else "FAIL"} {name}: relative error {err:.2e} (tolerance {tol:.1e})', flush=True)
        if not ok:
            failed.append(name)

    x = torch.randn(4, 3, 224, 224)
    for name in ('epsanet50_small', 'epsanet50_large') if 'cpu' in checks else ():
        m = model(name)
        with torch.no_grad():
            cpu = m(x)
            gpu = m.to(cuda)(x.to(cuda)).cpu()
        check(f'{name} CUDA fp32 logits == CPU', rel_err(gpu, cpu), 1e-4)

    if 'grads' in checks:
        # eval mode (BN affine): in train mode, BN over a tiny batch amplifies any rounding difference
        grads = {}
        for form, amp in (('grouped', False), ('grouped', True), ('depthwise', True), ('dense', True)):
            m = model(block_args=dict(psa_branch_form=form)).to(cuda, memory_format=torch.channels_last)
            xb = x.to(cuda).contiguous(memory_format=torch.channels_last)
            with torch.autocast('cuda', dtype=torch.float16, enabled=amp):
                loss = m(xb).float().logsumexp(1).mean()
            loss.backward()
            assert all(p.grad.dtype == torch.float32 for p in m.parameters())
            grads[form, amp] = torch.cat([p.grad.flatten() for p in m.parameters()])
        # fp16 rounding alone moves these gradients by a few percent (measured on CPU: 4.8%); a
        # form is right when it stays within that noise of the plain grouped conv's AMP error
        amp_noise = rel_err(grads['grouped', True], grads['grouped', False])
        check('AMP fp16 gradients, grouped form, vs fp32', amp_noise, 1e-1)
        for form in ('depthwise', 'dense'):
            check(f'AMP fp16 gradients, {form} form, vs fp32', rel_err(grads[form, True], grads['grouped', False]),
                  1.5 * amp_noise)

    for amp in (False, True) if 'compile' in checks else ():
        m = model().to(cuda, memory_format=torch.channels_last)
        xb = x.to(cuda).contiguous(memory_format=torch.channels_last)
        compiled = torch.compile(m)
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16, enabled=amp):
            eager, comp = m(xb), compiled(xb)
        check(f'torch.compile logits == eager ({"AMP" if amp else "fp32"}, channels_last)',
              rel_err(comp, eager), 1e-2 if amp else 1e-4)
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
