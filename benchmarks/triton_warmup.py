"""Compile every Triton branch kernel EPSANet runs, in parallel processes, before anything is timed.

Triton compiles a kernel at its first launch, one specialization at a time, about a second each,
and keeps it in its on-disk cache (TRITON_CACHE_DIR, by default ~/.triton/cache) for every later
process. A GPU run that times models and branches would otherwise pay those compiles inside its
timed stages, one by one. This launches each Triton form's forward and both gradients on every
grouped PSA branch of Small and Large (Large's shapes also cover the 101 variants'), and the fused
kernels ('triton_spc', 'auto' with the kernels) and the attention's on every PSA, at the real resolutions (strides are
specialized on divisibility) and batch 2 (sizes are not), as `run_cuda.sh` runs them (`LAUNCHES`,
`FUSED_LAUNCHES`: fp32 weights under autocast, whose casts the weight-preparation kernels do),
and with `--tiles` the candidate tiles of a `triton_tiles.py` sweep (one process per kernel kind),
spread over `--processes`.

    python benchmarks/triton_warmup.py --processes 12
    TRITON_INTERPRET=1 python benchmarks/triton_warmup.py --device cpu --processes 1 --max-launches 1 --size 4   # the code path
"""
import argparse
import contextlib
import io
import multiprocessing
import shlex
import time
from functools import partial

import torch

from psa_branches import psa_stages
from timm_epsanet.epsanet import PSA_KERNELS

# (form, dtype, layout, strides) as run_cuda.sh runs them: the models channels-last (AMP fp16 and
# bf16; the CUDA-core kernels in fp16 only), the per-branch timings in both layouts at stride 1
LAUNCHES = [('triton_mma', 'float16', 'channels_last', (1, 2)), ('triton_mma', 'bfloat16', 'channels_last', (1, 2)),
            ('triton', 'float16', 'channels_last', (1, 2)), ('triton_mma', 'float16', 'nchw', (1,)),
            ('triton', 'float16', 'nchw', (1,))]
# (dtype, layout, strides) of the PSAs with their branches fused ('triton_spc'): the models' 'auto' rows
FUSED_LAUNCHES = [('float16', 'channels_last', (1, 2)), ('bfloat16', 'channels_last', (1, 2))]


def launches(size=None, layouts=('channels_last', 'nchw'), forms=('triton_mma', 'triton')):
    """(chs, kernel, groups, stride, output size, form, dtype, layout) of every branch conv to run
    in `layouts` and `forms` (NCHW and the CUDA-core kernels: only the per-branch timings run them,
    a stage run_cuda.sh leaves out by default)."""
    found = []
    for form, dtype, layout, strides in (launch for launch in LAUNCHES if launch[2] in layouts and launch[0] in forms):
        for psa in psa_stages(['small', 'large']):
            for k, groups in zip(PSA_KERNELS, psa['groups']):
                if groups == 1 or psa['chs'] == groups:
                    continue  # a dense or depthwise conv: never a Triton form
                for stride in strides if psa['stage'] > 1 else (1,):
                    found.append((psa['chs'], k, groups, stride, size or psa['size'], form, dtype, layout))
    return found


def fused_launches(size=None):
    """('psa', chs, groups, stride, output size, dtype, layout) of every PSA to run fused."""
    return [('psa', psa['chs'], tuple(psa['groups']), stride, size or psa['size'], dtype, layout)
            for dtype, layout, strides in FUSED_LAUNCHES for psa in psa_stages(['small', 'large'])
            for stride in (strides if psa['stage'] > 1 else (1,))]


def _fused_psa(psa, plans, x):
    """The PSA with its branches fused and its attention on the Triton kernels, as on CUDA (also on the dry run)."""
    return psa._attention_by_triton(psa.convs.run_plans(x, plans), in_place=False)


def tile_launches(tile_args: str):
    """One launch per kernel kind of `triton_tiles.py` with `tile_args` (its arguments, as
    run_cuda.sh's tiles_spc stage passes them): each of its tiles run once on batch 2, which
    compiles them, so that the stage times them instead of compiling them one by one."""
    import triton_tiles
    return [('tiles', kind, tile_args) for kind in triton_tiles.KINDS] if tile_args else []


def run(device, batch):
    from timm_epsanet._branch_conv import BranchConv2d
    from timm_epsanet.psa import PyramidSqueezeAttention
    for launch in batch:
        if launch[0] == 'tiles':
            import triton_tiles
            _, kind, tile_args = launch
            with contextlib.redirect_stdout(io.StringIO()):  # its table: timings of batch 2, meaningless
                triton_tiles.main(shlex.split(tile_args) + [
                    '--kinds', kind, '--device', device, '--batch-size', '2', '--iters', '1', '--warmup', '0'])
            continue
        if launch[0] == 'psa':
            _, chs, groups, stride, size, dtype, layout = launch
            module = PyramidSqueezeAttention(chs, stride=stride, groups=groups, branch_form='triton_spc')
            plans = [conv.plan_for('cuda', True) for conv in module.convs]
            forward = partial(_fused_psa, module, plans)
        else:
            chs, k, groups, stride, size, form, dtype, layout = launch
            module = BranchConv2d(chs, chs // 4, k, stride=stride, padding=k // 2, groups=groups, bias=False, form=form)
            forward = partial(module.forward_as, form=form)
        fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
        module.to(device)  # fp32 weights under autocast, as the models and benchmarks run them
        x = torch.randn(2, chs, size * stride, size * stride, device=device).contiguous(memory_format=fmt)
        with torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype), enabled=dtype != 'float32'):
            y = forward(x.requires_grad_())
        y.float().square().sum().backward()
    if device == 'cuda':
        torch.cuda.synchronize()
    return len(batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--processes', type=int, default=12)
    parser.add_argument('--max-launches', type=int, default=None, help='of each kind: fused PSAs, branches')
    parser.add_argument('--size', type=int, default=None, help='every branch at this output resolution (CPU checks)')
    parser.add_argument('--layouts', nargs='+', default=['channels_last', 'nchw'], choices=['channels_last', 'nchw'],
                        help="the single branches' layouts (the models and fused PSAs run channels-last)")
    parser.add_argument('--forms', nargs='+', default=['triton_mma', 'triton'], choices=['triton_mma', 'triton'],
                        help="the single branches' Triton forms: tensor-core kernels, CUDA-core kernels")
    parser.add_argument('--tiles', default='', help="also the tiles of `triton_tiles.py` with these arguments")
    args = parser.parse_args(argv)
    todo = (tile_launches(args.tiles) + fused_launches(args.size)[:args.max_launches]
            + launches(args.size, args.layouts, args.forms)[:args.max_launches])
    start = time.perf_counter()
    with multiprocessing.get_context('spawn').Pool(args.processes) as pool:
        done = sum(pool.starmap(run, [(args.device, todo[i::args.processes]) for i in range(args.processes)]))
    print(f'{done} PSAs, branch convs (forward and both gradients) and tile sweeps run in '
          f'{time.perf_counter() - start:.0f} s on {args.processes} processes')


if __name__ == '__main__':
    main()
