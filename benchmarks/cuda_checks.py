"""Correctness checks that need a CUDA GPU (CI has none; the CPU test suite covers the rest).

    python benchmarks/cuda_checks.py

1. CUDA fp32 logits equal the CPU's (TF32 off).
2. AMP (fp16) training through the depthwise-form branches (custom autograd function) gives the
   gradients of plain grouped convs, with fp32 parameter gradients.
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
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.device('cuda')
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}')
    failed = []

    def check(name, err, tol):
        ok = err == err and err <= tol  # NaN fails
        print(f'{"PASS" if ok else "FAIL"} {name}: relative error {err:.2e} (tolerance {tol:.0e})', flush=True)
        if not ok:
            failed.append(name)

    x = torch.randn(4, 3, 224, 224)
    for name in ('epsanet50_small', 'epsanet50_large'):
        m = model(name)
        with torch.no_grad():
            cpu = m(x)
            gpu = m.to(cuda)(x.to(cuda)).cpu()
        check(f'{name} CUDA fp32 logits == CPU', rel_err(gpu, cpu), 1e-4)

    grads = {}
    for form in ('depthwise', 'grouped'):
        m = model(block_args=dict(psa_depthwise=form == 'depthwise')).train().to(cuda, memory_format=torch.channels_last)
        xb = x.to(cuda).contiguous(memory_format=torch.channels_last)
        with torch.autocast('cuda', dtype=torch.float16):
            loss = m(xb).float().logsumexp(1).mean()
        loss.backward()
        conv = m.layer1[0].conv2.convs[3]
        assert conv.depthwise == (form == 'depthwise') and conv.weight.grad.dtype == torch.float32
        grads[form] = torch.cat([p.grad.flatten() for p in m.parameters()])
    check('AMP fp16 training: depthwise-form gradients == grouped-conv gradients',
          rel_err(grads['depthwise'], grads['grouped']), 2e-2)

    for amp in (False, True):
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
