"""Check the CPU inference plan 'auto' picks for whole PSA modules against its neighbours.

A PSA runs each branch in a form and memory layout (`BranchConv2d.plan_for`) and makes at most one
NCHW and one channels-last copy of its input, shared by the branches that want it. So one branch's
best choice depends on the others', and per-branch timings (psa_branches.py) cannot settle it. This
script times every PSA shape of EPSANet (each stage, stride 1 and the strided first block, Small
and Large) under auto's plan and under every plan that changes one branch's (form, layout),
interleaved (one call of each plan per round, the median over rounds), and prints a table with
the fastest neighbour. A neighbour much faster than auto means `cpu_branch_plan` is wrong there.

    python benchmarks/psa_plans.py --json benchmarks/results/psa_plans-cpu-channels_last.json   # batch 8
    python benchmarks/psa_plans.py --layout nchw --json benchmarks/results/psa_plans-cpu-nchw.json

Per-call times of 5-20 ms on a shared VM vary by several percent from run to run, and glibc's
page faults move them further; run with MALLOC_TRIM_THRESHOLD_=1099511627776
MALLOC_MMAP_THRESHOLD_=1073741824 in the environment for stable numbers (benchmarks/README.md).
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from psa_branches import LAYOUTS, psa_stages, write_json
from timm_epsanet.psa import PyramidSqueezeAttention

# (form, layout) a reformulable branch may run in; each form in the layouts it is fast in
CHOICES = (('grouped', 'nchw'), ('grouped', 'channels_last'), ('depthwise', 'channels_last'), ('volumetric', 'nchw'))


def psa_shapes(variants):
    for psa in psa_stages(variants):
        for stride in ((1,) if psa['stage'] == 1 else (2, 1)):  # stage 1 keeps the stem's resolution
            yield dict(psa, stride=stride, size=psa['size'] * stride)


def plan_name(plan):
    return ' '.join(f'{form}/{layout}' for form, layout in plan)


def neighbours(convs, auto):
    """Plans differing from `auto` in one reformulable branch."""
    for i, conv in enumerate(convs):
        if conv.form != 'auto' or conv.groups == 1 or conv.in_channels == conv.groups:
            continue  # a dense or depthwise conv already: one form only
        for choice in CHOICES:
            if choice != auto[i]:
                yield auto[:i] + [choice] + auto[i + 1:]


def set_plan(convs, plan):
    for conv, choice in zip(convs, plan):
        conv.cpu_plans[0] = choice  # index 0: inference, fp32


def measure(shape, args):
    psa = PyramidSqueezeAttention(shape['chs'], stride=shape['stride'], groups=shape['groups']).eval()
    convs = list(psa.convs)
    auto = [conv.plan_for('cpu', False) for conv in convs]
    plans = [auto] + list(neighbours(convs, auto))
    x = torch.randn(args.batch_size, shape['chs'], shape['size'], shape['size'])
    x = x.contiguous(memory_format=LAYOUTS[args.layout])
    times = [[] for _ in plans]
    with torch.inference_mode():
        expected = psa(x)
        for plan in plans:  # warm-up, and every plan computes the same function
            set_plan(convs, plan)
            torch.testing.assert_close(psa(x), expected, rtol=1e-4, atol=1e-4)
        for _ in range(args.rounds):
            for plan, plan_times in zip(plans, times):
                set_plan(convs, plan)
                start = time.perf_counter()
                psa(x)
                plan_times.append(time.perf_counter() - start)
    set_plan(convs, auto)
    ms = [1e3 * statistics.median(t) for t in times]
    best = min(range(1, len(plans)), key=ms.__getitem__, default=0)
    return dict(shape, auto=plan_name(auto), auto_ms=ms[0], best_neighbour=plan_name(plans[best]),
                best_neighbour_ms=ms[best], neighbours=len(plans) - 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--layout', default='channels_last', choices=list(LAYOUTS), help="the PSA input's layout")
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--variants', nargs='+', default=['small', 'large'], choices=['small', 'large'])
    parser.add_argument('--json', type=Path, default=None, help='also write the rows here')
    args = parser.parse_args(argv)
    print(f'cpu, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.layout} input, fp32 inference; '
          f'median ms of {args.rounds} interleaved rounds')
    print('| variant | stage | stride | chs | auto plan (branches 1-4) | auto ms | fastest neighbour | ms | auto / neighbour |')
    print('|---|---|---|---|---|---|---|---|---|')
    rows = []
    for shape in psa_shapes(args.variants):
        row = measure(shape, args)
        rows.append(row)
        print(f'| {row["variant"]} | {row["stage"]} | {row["stride"]} | {row["chs"]} | {row["auto"]} | {row["auto_ms"]:.2f} | '
              f'{row["best_neighbour"]} | {row["best_neighbour_ms"]:.2f} | {row["auto_ms"] / row["best_neighbour_ms"]:.2f} |',
              flush=True)
    if args.json:
        write_json(args.json, torch.device('cpu'), args, rows)


if __name__ == '__main__':
    main()
