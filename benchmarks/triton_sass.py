"""The Triton branch kernels built for Hopper (sm_90a) without a GPU, and their innermost loops read.

Triton compiles for a GPU it does not have (`triton.compile` with an sm_90 target, then its own
`ptxas` and `cuobjdump`), so each kernel EPSANet runs can be built here and its machine code read:
registers, spills, shared memory (more than a block may have fails at launch, not at build) and
the blocks a multiprocessor holds at once, and the innermost loop, the one that runs once per
tap. A multiprocessor issues one instruction per scheduler per cycle, so that loop's instruction
count bounds the kernel's speed before memory does: of each iteration's issue slots, only the
multiply-adds (FFMA) or the tensor-core products (HGMMA / HMMA) do the work. `issue bound` is the
fraction of the unit's peak rate the loop could reach if nothing else stalled it: FFMA /
instructions on CUDA cores; the products' multiply-adds per issue cycle over the tensor cores'
rate on tensor cores (1.00: the loop issues faster than its unit multiplies). It is an upper
bound, not a speed: a GPU measures that (`triton_tiles.py`, `psa_branches.py`). `tap loads`
says where that loop's loads of the shifted tiles come from: Triton's software pipeline (its
default, `--num-stages 3`) turns them into asynchronous copies to shared memory that bypass L1
(LDGSTS...BYPASS), so each tap reads L2 again; unpipelined (`--num-stages 1`) they are plain loads
(LDG), which L1 caches, and consecutive taps' tiles mostly overlap.

The kernels are built at fp16 for the stride-1 branches of epsanet50_small that they run: the
CUDA-core kernels ('triton') for 2-8 outputs per group as the groups are, the tensor-core kernels
('triton_mma') on the groups 'triton_mma' merges.

    python benchmarks/triton_sass.py                       # a markdown table
    python benchmarks/triton_sass.py --json /tmp/sass.json
    python benchmarks/triton_sass.py --layout nchw         # as NCHW tensors specialize them
    python benchmarks/triton_sass.py --num-stages 1        # the loads unpipelined, through L1
"""
import argparse
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from timm_epsanet import _triton_branch as tb
from timm_epsanet import _triton_spc as tsp
from timm_epsanet._branch_forms import regroup_factor

BIN = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin'


def ptxas() -> Path:
    """The ptxas Triton itself builds sm_90 code with: from triton 3.9 the newer of the two it ships
    ('ptxas-blackwell'), whose PTX version the other cannot read."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(90).path)
    except (ImportError, AttributeError):  # a triton without the choice: its one ptxas
        return BIN / 'ptxas'

# per multiprocessor and cycle, Hopper: FP32 multiply-adds on CUDA cores; dense FP16 ones on tensor cores
CUDA_CORE_MACS_PER_CYCLE = 128
TENSOR_CORE_MACS_PER_CYCLE = 2048
ISSUE_PER_CYCLE = 4  # warp instructions: one per scheduler
# per multiprocessor (Hopper): registers, shared memory (a block may take 227 KB of it, and the
# driver reserves 1 KB more per block), warps and blocks in flight
REGISTERS_PER_SM = 65536
SHARED_PER_SM, SHARED_PER_BLOCK, SHARED_RESERVED = 228 * 1024, 227 * 1024, 1024
MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 64, 32
# epsanet50_small's grouped branches per stage: output width, and (inputs per group, outputs per
# group, groups) of its kernel 5, 7 and 9 branches
SMALL_BRANCHES = {1: (56, [(16, 4, 4), (8, 2, 8), (4, 1, 16)]), 2: (28, [(32, 8, 4), (16, 4, 8), (8, 2, 16)]),
                  3: (14, [(64, 16, 4), (32, 8, 8), (16, 4, 16)]), 4: (7, [(128, 32, 4), (64, 16, 8), (32, 8, 16)])}
KERNELS = {  # name: (kernel, tensor cores, transposed: None for the weight gradient)
    'forward': (tb._conv_kernel, False, False), 'grad_input': (tb._conv_kernel, False, True),
    'grad_weight': (tb._weight_grad_kernel, False, None),
    'mma forward': (tb._conv_mma_kernel, True, False), 'mma grad_input': (tb._conv_mma_kernel, True, True),
    'mma grad_weight': (tb._weight_grad_mma_kernel, True, None),
}


def build_sm90(kernel, dtype: str, c_in: int, c_out: int, groups: int, transposed, width: int = 56,
               kernel_width: int = 9, config=None, phased: bool = False, layout: str = 'channels_last',
               num_stages: int = None):
    """Build `kernel` for sm_90a as a launch of EPSANet's shapes in `layout` specializes it
    (`_build`), weight-gradient tiles for an output `width` wide and a kernel `kernel_width` wide,
    the input gradient by phases where `phased` (a strided conv's); returns (config, ptxas report,
    SASS, shared memory bytes per block)."""
    names = list(inspect.signature(kernel.fn).parameters)
    mma = 'PRECISION' in names
    c_red, c_written = (c_out, c_in) if transposed else (c_in, c_out)
    cfg = config or (tb.mma_config_for(c_red, c_written, kernel_width) if mma else tb.config_for(groups, c_red, c_written))
    cfg = cfg._replace(num_stages=num_stages or cfg.num_stages)
    consts = dict(BLOCK_R=cfg.block_r, BLOCK_O=cfg.block_o)
    if transposed is None:  # as `_launch_weight_grad` tiles the pixels
        block_w = min(triton.next_power_of_2(width), cfg.block_p)
        consts.update(BLOCK_H=cfg.block_p // block_w, BLOCK_W=block_w)
        if mma:
            consts.update(BLOCK_T=cfg.block_t)
    else:
        consts.update(BLOCK_P=cfg.block_p)
    consts.update(dict(PRECISION='tf32') if mma else dict(BLOCK_G=cfg.block_g))
    consts.update(dict(C_IN=c_in, C_OUT=c_out) if transposed is None else
                  dict(C_RED=c_red, C_OUT=c_written, TRANSPOSED=transposed, PHASED=phased))
    return (cfg, *_build(kernel, dtype, consts, cfg.num_warps, layout, num_stages=cfg.num_stages))


SPC_KERNELS = {'forward': tsp._spc_mma_kernel, 'grad_input': tsp._spc_grad_input_mma_kernel,
               'grad_weight': tsp._spc_weight_grad_mma_kernel}


def build_spc_sm90(kind: str, dtype: str, kernel_sizes, c_in: int, c_out: int, width: int = 56, config=None,
                   layout: str = 'channels_last', num_stages: int = None):
    """Build the fused kernel of `_triton_spc` of `kind` ('forward', 'grad_input', 'grad_weight')
    for branches of `kernel_sizes` over groups of `c_in` -> `c_out` channels, as `build_sm90`
    builds the others."""
    c_red, c_written = (c_out, c_in) if kind == 'grad_input' else (c_in, c_out)
    cfg = config or tb.mma_config_for(c_red, c_written)
    cfg = cfg._replace(num_stages=num_stages or cfg.num_stages)
    radii = tsp._radii(kernel_sizes)
    consts = dict(R0=radii[0], R1=radii[1], R2=radii[2], R3=radii[3], R_MAX=max(radii), PRECISION='tf32',
                  BLOCK_R=cfg.block_r, BLOCK_O=cfg.block_o)
    if kind == 'grad_weight':  # as `weight_grad_chunks` tiles the pixels
        block_w = min(triton.next_power_of_2(width), cfg.block_p)
        consts.update(C_IN=c_in, C_OUT=c_out, BLOCK_H=cfg.block_p // block_w, BLOCK_W=block_w, NB=len(kernel_sizes),
                      STACKED=cfg.stack_branches, PAIR=cfg.pair_taps)
    else:
        consts.update(C_RED=c_red, C_OUT=c_written, BLOCK_P=cfg.block_p, TILE_W=cfg.tile_w)
    return (cfg, *_build(SPC_KERNELS[kind], dtype, consts, cfg.num_warps, layout, num_stages=cfg.num_stages))


def _build(kernel, dtype: str, consts: dict, num_warps: int, layout: str = 'channels_last', types=None,
           num_stages: int = 3):
    """(ptxas report, SASS, shared memory bytes per block) of `kernel` built for sm_90a with
    `consts`, its tensors' strides specialized as Triton specializes a launch in `layout` on
    EPSANet's shapes: channels-last, channel strides of 1 and the others multiples of 16; NCHW,
    column strides of 1, image and channel strides multiples of 16 (H x W is at stages 1-2) and
    row strides (W: 56, 28, 14, 7) not. Pointers are multiples of 16 bytes. `types`: arguments of
    other types than these rules give (name: Triton type)."""
    names = list(inspect.signature(kernel.fn).parameters)
    unit, aligned_strides = (r'[sdxy]_c', r'[sdxy]_[nhw]') if layout == 'channels_last' else (r'[sdxy]_w', r'[sdxy]_[nc]')
    consts = dict(consts, **{name: 1 for name in names if re.fullmatch(unit, name)})
    signature = {name: 'constexpr' if name in consts else '*fp32' if re.fullmatch(r'part_ptr|p\d_ptr', name)
                 else f'*{dtype}' if name.endswith('_ptr') else 'i32' for name in names}
    signature.update({name: t for name, t in (types or {}).items() if name in signature})
    aligned = {(names.index(name),): [['tt.divisibility', 16]] for name in names if name not in consts and (
        name.endswith('_ptr') or re.fullmatch(aligned_strides, name))}
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in consts.items()}, aligned)
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, **tb.FMA))  # as launched
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / 'k.ptx', Path(tmp) / 'k.cubin'
        ptx.write_text(compiled.asm['ptx'])
        report = subprocess.run([str(ptxas()), '-v', '--gpu-name', 'sm_90a', str(ptx), '-o', str(cubin)],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(BIN / 'cuobjdump'), '--dump-sass', str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    return report, sass, compiled.metadata.shared


def instructions(sass: str):
    """(address, opcode, branch target or None) of each SASS instruction."""
    found = []
    for line in sass.splitlines():
        m = re.match(r'\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);', line)
        if m:
            target = re.search(r'0x([0-9a-f]+)', m.group(3)) if m.group(2) == 'BRA' else None
            found.append((int(m.group(1), 16), m.group(2), int(target.group(1), 16) if target else None))
    return found


def multiplying_loops(sass: str):
    """The bodies (opcodes) of the loops (a backward branch's span) that multiply, shortest first."""
    code = instructions(sass)
    loops = []
    for address, opcode, target in code:
        if opcode == 'BRA' and target is not None and target < address:
            body = [op for a, op, _ in code if target <= a <= address]
            if any(op.startswith(('FFMA', 'HGMMA', 'HMMA')) for op in body):
                loops.append(body)
    if not loops:
        raise ValueError('no loop that multiplies')
    return sorted(loops, key=len)


def loop_stats(body, num_warps: int) -> dict:
    """A loop's instructions, FFMAs and tensor-core products, the issue bound on its unit's peak,
    and where its global loads come from ('L2': asynchronous copies past L1; 'L1': plain loads)."""
    ffma = sum(op.split('.')[0] == 'FFMA' for op in body)
    mma_macs = 0
    for op in body:
        shape = re.match(r'H(G)?MMA\.(\d+)x(\d+)x(\d+)', op)
        if shape:  # HGMMA: one warpgroup's product (4 warps); HMMA: one warp's
            m, n, k = (int(v) for v in shape.groups()[1:])
            mma_macs += m * n * k * (num_warps // 4 if shape.group(1) else num_warps)
    cycles = len(body) * num_warps / ISSUE_PER_CYCLE
    bound = mma_macs / cycles / TENSOR_CORE_MACS_PER_CYCLE if mma_macs else ffma / len(body)
    bypass = any(op.startswith('LDGSTS') and 'BYPASS' in op for op in body)
    loads = 'L2' if bypass else 'L1' if any(op.split('.')[0] in ('LDG', 'LDGSTS') for op in body) else None
    return dict(instructions=len(body), ffma=ffma, mma_macs=mma_macs, issue_bound=round(min(bound, 1.0), 3),
                tap_loads=loads)


def innermost_loop(sass: str, num_warps: int) -> dict:
    """`loop_stats` of the shortest loop that multiplies (a branch kernel's: the loop over taps)."""
    return loop_stats(multiplying_loops(sass)[0], num_warps)


def fused_loop(sass: str, num_warps: int) -> dict:
    """A fused kernel's ring loops: `loop_stats` of the one that multiplies most (the rings every
    branch reaches), and each ring loop's as `loops`."""
    loops = [loop_stats(body, num_warps) for body in multiplying_loops(sass)]
    return dict(max(loops, key=lambda loop: loop['mma_macs']), loops=loops)


def rows(dtype: str = 'fp16', stages=(1, 2, 3, 4), layout: str = 'channels_last', num_stages: int = None):
    for stage in stages:
        width, branches = SMALL_BRANCHES[stage]
        yield from stage_rows(dtype, stage, width, branches, layout, num_stages)
        yield from fused_rows(dtype, stage, width, branches, layout, num_stages)


def fused_rows(dtype, stage, width, branches, layout, num_stages=None):
    """The fused kernels ('triton_spc') for the branches of a stage that share merged groups."""
    merged = [(c_in * m, c_out * m, groups // m) for c_in, c_out, groups in branches
              for m in [regroup_factor(groups, c_out, min_outs=16)]]
    fused = [k for k, shape in zip((5, 7, 9), merged) if shape == merged[-1]]
    c_in, c_out, groups = merged[-1]
    for kind in SPC_KERNELS:
        cfg, report, sass, shared = build_spc_sm90(kind, dtype, fused, c_in, c_out, width, layout=layout,
                                                   num_stages=num_stages)
        yield dict(stage=stage, branch=f"kernels {', '.join(map(str, fused))}", kernel=f'spc {kind}',
                   built=f'{c_in}->{c_out} x{groups}', tile=list(cfg), **resources(report, shared, cfg.num_warps),
                   **fused_loop(sass, cfg.num_warps))


def resources(report: str, shared: int, num_warps: int) -> dict:
    """Registers per thread and spills (from the ptxas report), shared memory per block, and the
    blocks a multiprocessor holds at once, whichever of registers (allocated per warp in units of
    256), shared memory, warps or blocks runs out first. 0 blocks: the launch fails on Hopper."""
    registers = int(re.search(r'Used (\d+) registers', report).group(1))
    spills = int(re.search(r'(\d+) bytes spill stores', report).group(1))
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(REGISTERS_PER_SM // per_warp // num_warps, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM,
                 SHARED_PER_SM // (shared + SHARED_RESERVED) if shared <= SHARED_PER_BLOCK else 0)
    return dict(registers=registers, spill_bytes=spills, shared_bytes=shared, blocks_per_sm=blocks)


def stage_rows(dtype, stage, width, branches, layout, num_stages=None):
    for (c_in, c_out, groups), kernel_width in zip(branches, (5, 7, 9)):
        merge = regroup_factor(groups, c_out, min_outs=16)
        for name, (kernel, mma, transposed) in KERNELS.items():
            if mma:
                shape = (c_in * merge, c_out * merge, groups // merge)
            elif c_out <= 8:
                shape = (c_in, c_out, groups)
            else:
                continue  # the CUDA-core kernels are written for up to 8 outputs per group
            cfg, report, sass, shared = build_sm90(kernel, dtype, *shape, transposed, width, kernel_width, layout=layout,
                                                   num_stages=num_stages)
            yield dict(stage=stage, branch=f'{c_in}->{c_out} x{groups}', kernel=name, built=f'{shape[0]}->{shape[1]} x{shape[2]}',
                       tile=list(cfg), **resources(report, shared, cfg.num_warps), **innermost_loop(sass, cfg.num_warps))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dtype', default='fp16', choices=['fp16', 'bf16'])
    parser.add_argument('--stages', nargs='+', type=int, default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    parser.add_argument('--layout', default='channels_last', choices=['channels_last', 'nchw'],
                        help="the tensors' layout the kernels are specialized for")
    parser.add_argument('--num-stages', type=int, default=None,
                        help="the loads' software-pipeline depth (default: the kernels' tiles', Triton's 3)")
    parser.add_argument('--json', type=Path, help='also write the rows here')
    args = parser.parse_args(argv)
    stages_note = f', num_stages={args.num_stages}' if args.num_stages else ''
    print(f'triton {triton.__version__}, sm_90a, {args.dtype}, {args.layout}{stages_note}, epsanet50_small stride-1 '
          'branches (inputs->outputs per group x groups)\n')
    print('| stage | branch | kernel | built as | registers | spills (B) | shared (KB) | blocks / SM | loop instructions | FFMA '
          '| MMA MACs | issue bound | tap loads |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    found = []
    for row in rows(args.dtype, args.stages, args.layout, args.num_stages):
        found.append(row)
        print(f"| {row['stage']} | {row['branch']} | {row['kernel']} | {row['built']} | {row['registers']} | "
              f"{row['spill_bytes']} | {row['shared_bytes'] / 1024:.0f} | {row['blocks_per_sm']} | {row['instructions']} | "
              f"{row['ffma']} | {row['mma_macs']} | {row['issue_bound']:.2f} | {row['tap_loads']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, dtype=args.dtype, layout=args.layout,
                                             num_stages=args.num_stages, rows=found), indent=1))


if __name__ == '__main__':
    main()
