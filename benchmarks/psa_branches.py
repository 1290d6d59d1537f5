"""Time each PSA branch conv of EPSANet in each form of `BranchConv2d`, on this device.

The 'auto' form picks per branch and device (`cpu_branch_plan` on CPU); this script is the
evidence for that rule (psa_plans.py checks the choices that interact within a PSA).
It prints one row per branch shape (EPSANet-50 stages, Small and Large)
with the milliseconds of the forward (inference) and forward + backward (training) of each form
in each memory layout of the input (the PSA module hands each branch the layout it runs fastest in).
The depthwise form is timed channels-last only (its NCHW depthwise convs were 3-6x slower on
CPU), the volumetric form NCHW only (it views NCHW memory as a volume); the regrouped form only
where it is neither the grouped nor the dense conv (NaN elsewhere).

With --whole-psa it times each PSA's branches together instead (`BranchConvs`, every branch in
the form, as the model runs them): one row per PSA stage, for the forms that act on a whole PSA
('triton_spc' computes the branches that share input slices in one kernel). `--strides 1 2` adds
the strided first blocks of stages 2-4.

    python benchmarks/psa_branches.py --json benchmarks/results/psa_branches-cpu.json        # CPU, batch 8, fp32
    python benchmarks/psa_branches.py --device cuda --batch-size 128 --amp --layouts channels_last
    python benchmarks/psa_branches.py --device cuda --batch-size 128 --amp --layouts channels_last --whole-psa \
        --forms grouped dense triton_mma triton_spc --strides 1 2
"""
import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

from benchmark import timed
from timm_epsanet._branch_tuning import cpu_model
from timm_epsanet._branch_conv import BRANCH_FORMS, BranchConv2d
from timm_epsanet.epsanet import LARGE_GROUPS, PSA_KERNELS, SMALL_GROUPS
from timm_epsanet.psa import PyramidSqueezeAttention

# (PSA width, output resolution of its stride-1 blocks) of the four stages of EPSANet Small;
# Large is twice as wide
STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))
LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


def psa_stages(variants):
    """(variant, stage, PSA width, resolution, branch groups) of EPSANet's PSA stages."""
    for variant, groups, widen in (('small', SMALL_GROUPS, 1), ('large', LARGE_GROUPS, 2)):
        if variant in variants:
            for stage, (width, size) in enumerate(STAGES, start=1):
                yield dict(variant=variant, stage=stage, chs=width * widen, size=size, groups=groups)


def strided_psas(variants, strides=(1,)):
    """`psa_stages` at each of `strides`, a variant's stride-1 PSAs first: at stride 2 the first
    block of stages 2-4 (stage 1 keeps the stem's resolution), on an input twice the size."""
    for variant in (v for v in ('small', 'large') if v in variants):
        for stride in strides:
            for psa in psa_stages([variant]):
                if stride == 1 or psa['stage'] > 1:
                    yield dict(psa, stride=stride)


def shapes(variants, strides=(1,)):
    for psa in strided_psas(variants, strides):
        for k, g in zip(PSA_KERNELS, psa['groups']):
            yield dict(psa, kernel=k, groups=g)


def write_json(path, device, args, rows):
    """The rows, with the machine they were measured on and the date."""
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else cpu_model()
    machine += f', {torch.get_num_threads()} threads, torch {torch.__version__}'
    date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(json.dumps(dict(machine=machine, date=date, args=args, rows=rows), indent=1))


def time_ms(fn, device, iters, warmup=3):
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(timed(fn, device) for _ in range(iters))


def candidates(args):
    """(form, layout) pairs to time; column names are form/layout."""
    only = {'depthwise': 'channels_last', 'volumetric': 'nchw'}
    return [(form, layout) for form in args.forms for layout in args.layouts if only.get(form, layout) == layout]


def measure(shape, args, device):
    """One branch shape (`shapes`), or with --whole-psa one PSA's branches (`psa_stages`), in each
    candidate form and layout."""
    chs, out_chs, stride = shape['chs'], shape['chs'] // 4, shape['stride']
    x_any = torch.randn(args.batch_size, chs, shape['size'] * stride, shape['size'] * stride, device=device)
    amp_dtype = (torch.float16 if device.type == 'cuda' else torch.bfloat16) if args.amp else None
    row = dict(shape)
    for form, layout in candidates(args):
        key = f'{form}/{layout}'
        if args.whole_psa:
            module = PyramidSqueezeAttention(chs, stride=stride, groups=shape['groups'], branch_form=form,
                                             device=device).convs
        else:
            module = BranchConv2d(chs, out_chs, shape['kernel'], stride=stride, padding=shape['kernel'] // 2,
                                  groups=shape['groups'], bias=False, form=form, device=device)
            # 1 input per group or 1 group: nothing to reformulate; regrouped merging none or all groups
            if module.form != form or (form == 'regrouped' and module.regroup in (1, module.groups)):
                row[f'{key}_infer_ms'] = row[f'{key}_train_ms'] = float('nan')
                continue
        module.to(memory_format=LAYOUTS[layout])
        x = x_any.contiguous(memory_format=LAYOUTS[layout])
        x_train = x.detach().requires_grad_()

        def infer():
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                module(x)

        def train():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                y = module(x_train)
            y.backward(torch.ones_like(y))

        module.eval()  # inference as served: eval mode keeps what the forms build from the weights
        row[f'{key}_infer_ms'] = time_ms(infer, device, args.iters)
        module.train()
        row[f'{key}_train_ms'] = time_ms(train, device, args.iters)
    if args.whole_psa:
        auto = PyramidSqueezeAttention(chs, stride=stride, groups=shape['groups']).convs
        row['auto'] = ' / '.join(' '.join(conv.plan_for(device.type, grad, args.amp)[0] for conv in auto)
                                 for grad in (False, True))
    else:
        auto = BranchConv2d(chs, out_chs, shape['kernel'], stride=stride, groups=shape['groups'], bias=False)
        row['auto'] = ' / '.join(
            '{}/{}'.format(*auto.plan_for(device.type, grad, args.amp)) for grad in (False, True))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--layouts', nargs='+', default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--forms', nargs='+', default=['grouped', 'depthwise', 'volumetric', 'dense', 'regrouped'],
                        choices=BRANCH_FORMS[1:], help="'triton': CUDA only")
    parser.add_argument('--variants', nargs='+', default=['small', 'large'], choices=['small', 'large'])
    parser.add_argument('--whole-psa', action='store_true', help="each PSA's branches together, one row per PSA")
    parser.add_argument('--strides', nargs='+', type=int, default=[1], choices=[1, 2],
                        help="2: also the strided first block of stages 2-4 (after a variant's stride-1 rows)")
    parser.add_argument('--json', type=Path, default=None, help='also write the rows here')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    print(f'{device}, batch {args.batch_size}, {"amp" if args.amp else "fp32"}; milliseconds')
    keys = [f'{form}/{layout}' for form, layout in candidates(args)]
    cols = [f'{key} {mode}' for mode in ('infer', 'train') for key in keys]
    print('| variant | stage | stride | chs | size | k | groups | ' + ' | '.join(cols) + ' | auto picks (infer/train) |')
    print('|' + '---|' * (8 + len(cols)))
    rows = []
    for shape in strided_psas(args.variants, args.strides) if args.whole_psa else shapes(args.variants, args.strides):
        row = measure(shape, args, device)
        rows.append(row)
        times = [row[f'{key}_{mode}_ms'] for mode in ('infer', 'train') for key in keys]
        groups = ','.join(map(str, row['groups'])) if args.whole_psa else row['groups']
        print(f'| {row["variant"]} | {row["stage"]} | {row["stride"]} | {row["chs"]} | {row["size"]} | '
              f'{row.get("kernel", "all")} | '
              f'{groups} | ' + ' | '.join(f'{t:.3f}' for t in times) + f' | {row["auto"]} |', flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            write_json(args.json, device, args, rows)


if __name__ == '__main__':
    main()
