"""Time the Triton branch kernels on tiles around their defaults, for each EPSANet branch they run.

`timm_epsanet._triton_branch.config_for` (CUDA cores) and `mma_config_for` (tensor cores) pick
each kernel's tile (pixels x groups x reduction channels x written channels, and warps) without a
GPU; which tile is fastest depends on the GPU. For every grouped PSA branch shape (2+ inputs per
group), this times the forward, input-gradient and weight-gradient kernels of each family asked
for (`--kernels`: the tensor-core kernels on the groups 'triton_mma' merges; the CUDA-core ones
where a group has at most 8 outputs) on the default tile and on its neighbours (the tensor-core
kernels' loads pipelined 1 or 2 deep instead of 3, the fused weight gradient's branches in one
product, half and twice the pixels, half the groups, other warp counts, half and twice the taps
per program of the tensor-core weight gradient), checks that each tile computes what the default
does, and writes one JSON row per (branch, kernel, tile) as it goes. Largest branches first, so a
run cut short by a time limit keeps the ones that matter most. The fused kernels of 'triton_spc'
(`--kernels spc`, first by default) are timed the same way per PSA stage, on the branches that
fuse there.

    python benchmarks/triton_tiles.py --device cuda --batch-size 128 --json /tmp/tiles.json
    TRITON_INTERPRET=1 python benchmarks/triton_tiles.py --device cpu --batch-size 1 --stages 1 --size 4 --max-shapes 1 --iters 1 --warmup 0
"""
import argparse
import math
from pathlib import Path

import torch

from psa_branches import psa_stages, shapes, time_ms, write_json
from timm_epsanet._branch_forms import block_diagonal_weight, regroup_factor

KINDS = ('forward', 'grad_input', 'grad_weight')
KERNELS = ('spc', 'mma', 'cuda_cores')  # fused tensor-core ('triton_spc'), tensor-core and CUDA-core kernels
# the outputs per group the CUDA-core kernels are written for
MAX_OUTS_PER_GROUP = 8


def triton_shapes(variants, stages=(1, 2, 3, 4), size=None):
    """The stride-1 grouped PSA branch shapes (2+ groups of 2+ inputs), largest (in MACs) first."""
    found = []
    for shape in shapes(variants):
        if shape['stage'] not in stages:
            continue
        in_per_group, outs = shape['chs'] // shape['groups'], shape['chs'] // 4 // shape['groups']
        if shape['groups'] > 1 and in_per_group > 1:
            found.append(dict(shape, size=size or shape['size']))
    return sorted(found, key=lambda s: -s['size'] ** 2 * s['chs'] ** 2 // s['groups'] * s['kernel'] ** 2)


def neighbour_tiles(default, kind='forward', tensor_cores=False, fused=False):
    """`default` first, then the tiles one step away from it. On tensor cores the loads' pipeline
    depth 1 first (loads through L1, see `Config`), then the fused forward and input gradient
    through L1 on tiles of 16 x 8 pixels (whose copies one tap apart overlap more than a run of
    128), the fused weight gradient's branches in one product or one each, and its taps in pairs
    (through L1), the depth 2 (less shared memory, more blocks per multiprocessor), and the weight
    gradient's taps per program: the steps most likely to matter. Each tap re-reads a
    tile that mostly overlaps the last one, and on the H200 the fused forward's time matched
    reading every tap's tile from L2 at about its bandwidth (benchmarks/README.md)."""
    tiles = [default]
    if tensor_cores:  # the CUDA-core kernels feed no `tl.dot`: Triton pipelines none of their loads
        tiles += [default._replace(num_stages=s) for s in (1, 2) if s != default.num_stages]
    if fused and kind != 'grad_weight':  # after the loads through L1: with them, on tiles of 16 x 8 pixels
        tiles.insert(2, default._replace(num_stages=1, tile_w=8))
    if fused and kind == 'grad_weight':  # after the loads through L1, before the depth of 2
        tiles.insert(2, default._replace(stack_branches=not default.stack_branches))
        # two taps per program, loads through L1: pipelined, a pair's shared memory leaves one block
        # per multiprocessor (benchmarks/README.md)
        tiles.insert(3, default._replace(pair_taps=True, num_stages=1))
    if kind == 'grad_weight' and tensor_cores and default.block_t > 1:  # taps per program: half, twice within 256 rows
        tiles += [default._replace(block_t=t) for t in (default.block_t // 2, default.block_t * 2)
                  if 1 <= t and t * default.block_r <= 256]
    for block_p in (default.block_p // 2, default.block_p * 2):
        if 16 <= block_p <= 256:
            tiles.append(default._replace(block_p=block_p))
    if default.block_g > 1:
        tiles.append(default._replace(block_g=default.block_g // 2))
    tiles += [default._replace(num_warps=w) for w in (2, 4, 8) if w != default.num_warps]
    return tiles


def kernel_runner(kind, groups, k, x, weight, grad, tensor_cores):
    """A function of a tile that runs one kernel of this branch and returns its output."""
    from timm_epsanet import _triton_branch as tb
    conv = dict(stride=(1, 1), padding=(k // 2, k // 2), dilation=(1, 1), tensor_cores=tensor_cores)
    if kind == 'grad_weight':
        return lambda tile: tb._launch_weight_grad(x, grad, weight, groups=groups, config=tile, **conv)
    src, dst_like = (x, grad) if kind == 'forward' else (grad, x)
    return lambda tile: tb._launch_conv(src, weight, torch.empty_like(dst_like), groups, transposed=kind != 'forward',
                                        config=tile, **conv)


def default_tile(kind, groups, in_per_group, outs, kernel, tensor_cores):
    from timm_epsanet._triton_branch import config_for, mma_config_for
    c_red, c_out = (outs, in_per_group) if kind == 'grad_input' else (in_per_group, outs)
    return mma_config_for(c_red, c_out, kernel) if tensor_cores else config_for(groups, c_red, c_out)


def fused_runner(kind, x, weights, grad, groups):
    """A function of a tile that runs one fused kernel of `_triton_spc` and returns its output."""
    from timm_epsanet import _triton_spc as tsp
    if kind == 'grad_weight':
        return lambda tile: torch.cat([w.flatten() for w in tsp._launch_weight_grad(
            x, grad, weights, (1, 1), (1, 1), groups, config=tile)])
    if kind == 'grad_input':
        return lambda tile: tsp._launch(grad, weights, torch.empty_like(x), (1, 1), (1, 1), groups, True, config=tile)
    return lambda tile: tsp._launch(x, weights, torch.empty_like(grad), (1, 1), (1, 1), groups, False, config=tile)


def measure_fused(psa, args, device):
    """The fused kernels on one PSA stage's branches that fuse (stride 1), each kernel on its
    default tile and the neighbours."""
    from timm_epsanet._triton_branch import mma_config_for
    from timm_epsanet.psa import PyramidSqueezeAttention
    dtype = getattr(torch, args.dtype)
    convs = PyramidSqueezeAttention(psa['chs'], groups=psa['groups'], branch_form='triton_spc').convs
    convs.to(device, dtype)
    plans = [conv.plan_for('cuda', True) for conv in convs]
    (run,) = convs.spc_runs(plans, ['channels_last'] * len(plans))
    size, layout = psa['size'], torch.channels_last
    x = torch.randn(args.batch_size, psa['chs'], size, size, device=device, dtype=dtype).contiguous(memory_format=layout)
    weights, groups = [], 1
    for i in run:
        _, weight, groups = convs[i].mma_inputs(x)  # merged as the form merges them
        weights.append(weight.detach())
    grad = torch.randn(args.batch_size, sum(w.shape[0] for w in weights), size, size, device=device, dtype=dtype)
    grad = grad.contiguous(memory_format=layout)
    ins, outs = weights[0].shape[1], weights[0].shape[0] // groups
    kernels = [convs[i].kernel_size[0] for i in run]
    rows = []
    for kind in args.kinds:
        run_tile = fused_runner(kind, x, weights, grad / grad.numel() ** 0.5, groups)
        default = mma_config_for(outs, ins) if kind == 'grad_input' else mma_config_for(ins, outs)
        default = default._replace(block_t=1)  # the fused weight gradient takes one tap per program
        rows += timed_tiles(run_tile, default, kind, True, args, device, dict(
            psa, kernel='+'.join(map(str, kernels)), groups=groups, kernels='spc', merge=None))
    return rows


def timed_tiles(run, default, kind, tensor_cores, args, device, row):
    """One row per tile (the default first): milliseconds, against the default, equal to it. A
    tile the GPU cannot launch (more shared memory than a block may have) is a row with its error,
    and the sweep goes on; if the default cannot launch, its neighbours are not compared."""
    from triton.runtime.errors import OutOfResources
    default_ms, reference, rows = None, None, []
    for tile in neighbour_tiles(default, kind, tensor_cores, row.get('kernels') == 'spc')[:args.max_tiles]:
        result = dict(row, batch_size=args.batch_size, dtype=args.dtype, kernel_kind=kind, tile=list(tile),
                      default=tile == default, ms=None, x_default=None, equal=None, error=None)
        rows.append(result)
        try:
            out = run(tile).float()
        except OutOfResources as e:
            result['error'] = str(e)
            if tile == default:
                break
            continue
        reference = out if tile == default else reference
        result['equal'] = bool(torch.allclose(out, reference, rtol=1e-2, atol=1e-2 * reference.abs().max().item()))
        result['ms'] = time_ms(lambda: run(tile), device, args.iters, args.warmup)
        default_ms = default_ms or result['ms']
        result['x_default'] = default_ms / result['ms']
    return rows


def measure(shape, args, device):
    chs, size, k = shape['chs'], shape['size'], shape['kernel']
    dtype = getattr(torch, args.dtype)
    layout = torch.channels_last
    x = torch.randn(args.batch_size, chs, size, size, device=device, dtype=dtype).contiguous(memory_format=layout)
    weight = torch.randn(chs // 4, chs // shape['groups'], k, k, device=device, dtype=dtype) / math.sqrt(chs * k * k)
    grad = torch.randn(args.batch_size, chs // 4, size, size, device=device, dtype=dtype).contiguous(memory_format=layout)
    rows = []
    groups, outs = shape['groups'], chs // 4 // shape['groups']
    for kernels in args.kernels:
        tensor_cores = kernels == 'mma'
        merge = regroup_factor(groups, outs, min_outs=16) if tensor_cores else 1
        if kernels == 'spc' or (not tensor_cores and outs > MAX_OUTS_PER_GROUP):
            continue  # the fused kernels: `measure_fused`, per PSA
        merged = block_diagonal_weight(weight, groups, merge) if merge > 1 else weight
        in_per_group = chs // groups * merge
        for kind in args.kinds:
            run = kernel_runner(kind, groups // merge, k, x, merged, grad, tensor_cores)
            default = default_tile(kind, groups // merge, in_per_group, outs * merge, k, tensor_cores)
            rows += timed_tiles(run, default, kind, tensor_cores, args, device, dict(shape, kernels=kernels, merge=merge))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--dtype', default='float16', choices=['float16', 'bfloat16', 'float32'])
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--variants', nargs='+', default=['small'], choices=['small', 'large'])
    parser.add_argument('--kernels', nargs='+', default=list(KERNELS), choices=KERNELS,
                        help='the kernel families, in this order per branch')
    parser.add_argument('--kinds', nargs='+', default=list(KINDS), choices=KINDS, help='the kernels of each family')
    parser.add_argument('--stages', nargs='+', type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    parser.add_argument('--size', type=int, default=None, help='every branch at this resolution (CPU checks)')
    parser.add_argument('--max-shapes', type=int, default=None)
    parser.add_argument('--max-tiles', type=int, default=None)
    parser.add_argument('--json', default=None, help='write the rows here, after every branch')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f'{device}, batch {args.batch_size}, {args.dtype}, channels-last; ms per kernel call')
    print('| variant | stage | chs | size | k | groups | kernels | kernel '
          '| tile (P, G, R, O, warps, T, stages, stacked, pairs, tile_w) | ms | x default | equal |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    rows = []
    psas = [dict(psa, size=args.size or psa['size']) for psa in psa_stages(args.variants) if psa['stage'] in args.stages]
    fused = [(measure_fused, psa) for psa in psas[:args.max_shapes]] if 'spc' in args.kernels else []
    for measure_one, shape in fused + [(measure, shape) for shape in
                                       triton_shapes(args.variants, args.stages, args.size)[:args.max_shapes]]:
        for row in measure_one(shape, args, device):
            rows.append(row)
            timing = (f'{row["ms"]:.3f} | {row["x_default"]:.2f} | {row["equal"]}' if row['error'] is None
                      else f'{row["error"]} | |')
            print(f'| {row["variant"]} | {row["stage"]} | {row["chs"]} | {row["size"]} | {row["kernel"]} | '
                  f'{row["groups"]} | {row["kernels"]} | {row["kernel_kind"]} | {tuple(row["tile"])}{" (default)" if row["default"] else ""} '
                  f'| {timing} |', flush=True)
        if args.json:
            write_json(Path(args.json), device, args, rows)
    return rows


if __name__ == '__main__':
    main()
