"""The multiply-adds of EPSANet's PSA branches per image in each branch form, and their floor on a GPU.

Every branch form computes the same function with a different amount of arithmetic: the grouped
conv its own MACs; 'regrouped' (adjacent groups merged into groups of 8 or more outputs) and
'triton_mma' (into groups of 16, `tl.dot`'s smallest tile) a few times that; 'dense' (all groups
merged) the group count times that. What pays is set by the units that run them: the grouped
conv's few outputs per group fit CUDA cores (the 'triton' kernels), merged groups fit tensor
cores, which run fp16 multiply-adds many times faster. This counts each form's MACs with torch's
own FLOP counter (`torch.utils.flop_counter`, on meta tensors: no data, seconds for all four
variants) and divides them by a GPU's peak rate for its unit: a floor no kernel of that form can
beat. Against the time per image the speed target leaves the whole model (a fraction of
resnet50's measured speed), that says which forms can reach it at all.

Only the grouped branches with 2 or more inputs per group are counted ('reformulable': the forms
apply to them); the kernel-3 branch (one group) is a dense conv for every form.

    python benchmarks/branch_macs.py                      # H200 peak rates, resnet50 from the H200 results
    python benchmarks/branch_macs.py --cuda-core-tflops 67 --tensor-core-tflops 989 --reference-img-s 13580
"""
import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
import timm_epsanet  # noqa: F401  registers the models
from timm_epsanet._branch_conv import BranchConv2d, BranchConvs
from timm_epsanet._branch_forms import block_diagonal_weight
from timm_epsanet._branch_tuning import reformulable

RESULTS = Path(__file__).resolve().parent / 'results'
VARIANTS = ('epsanet50_small', 'epsanet50_large', 'epsanet101_small', 'epsanet101_large')
# the forms counted, and the unit each runs on
FORMS = {'grouped': 'cuda cores', 'regrouped': 'tensor cores', 'triton_mma': 'tensor cores', 'dense': 'tensor cores'}
# NVIDIA's H200 SXM data sheet (the same for H100 SXM): FP32 on CUDA cores; FP16 tensor cores, dense
H200_CUDA_CORE_TFLOPS = 67
H200_TENSOR_CORE_TFLOPS = 989


def merge_of(conv: BranchConv2d, form: str) -> int:
    """How many adjacent groups `form` merges into one."""
    return {'grouped': 1, 'regrouped': conv.regroup, 'triton_mma': conv.mma_regroup, 'dense': conv.groups}[form]


def conv_macs(x: torch.Tensor, conv: BranchConv2d, merge: int) -> int:
    """MACs of `conv` on `x` with `merge` groups merged (block-diagonal weights), by torch's counter."""
    weight = block_diagonal_weight(conv.weight, conv.groups, merge) if merge > 1 else conv.weight
    with FlopCounterMode(display=False) as counter:
        F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups // merge)
    return counter.get_total_flops() // 2


def branch_macs(variant: str, img_size: int = 224) -> dict:
    """Per image: MACs of the reformulable PSA branches in each form (`FORMS`), and of the others."""
    model = timm.create_model(variant, device='meta').eval()
    inputs = {}  # each branch conv's input: its PSA's (BranchConvs calls the convs' forms, not the modules)

    def keep_input(module, args):
        inputs.update((conv, args[0]) for conv in module)
    hooks = [m.register_forward_pre_hook(keep_input) for m in model.modules() if isinstance(m, BranchConvs)]
    with torch.no_grad():
        model(torch.empty(1, 3, img_size, img_size, device='meta'))
    for hook in hooks:
        hook.remove()
    macs = dict.fromkeys(FORMS, 0)
    macs['other branches'] = 0
    for conv, x in inputs.items():
        if reformulable(conv):
            for form in FORMS:
                macs[form] += conv_macs(x, conv, merge_of(conv, form))
        else:
            macs['other branches'] += conv_macs(x, conv, 1)
    return macs


def reference_img_s(path: Path = RESULTS / 'benchmark-cuda-h200.csv') -> float:
    """resnet50's AMP channels-last inference speed in the GPU results file."""
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            if row['model'] == 'resnet50' and row['mode'] == 'infer' and row['precision'] == 'amp':
                return float(row['img_s'])
    raise ValueError(f'{path}: no resnet50 AMP inference row')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--cuda-core-tflops', type=float, default=H200_CUDA_CORE_TFLOPS,
                        help='peak FP32 rate of the CUDA cores (default: H200 SXM)')
    parser.add_argument('--tensor-core-tflops', type=float, default=H200_TENSOR_CORE_TFLOPS,
                        help='peak dense FP16 rate of the tensor cores (default: H200 SXM)')
    parser.add_argument('--reference-img-s', type=float, default=None,
                        help="resnet50's inference img/s (default: results/benchmark-cuda-h200.csv)")
    parser.add_argument('--target', type=float, default=0.8, help='the speed target, x resnet50')
    args = parser.parse_args(argv)
    reference = args.reference_img_s or reference_img_s()
    budget_us = 1e6 / (args.target * reference)
    rates = {'cuda cores': args.cuda_core_tflops, 'tensor cores': args.tensor_core_tflops}
    print(f'Per image at {args.img_size}x{args.img_size}. Peak rates: CUDA cores {args.cuda_core_tflops:g} TFLOPS, '
          f'tensor cores {args.tensor_core_tflops:g} TFLOPS. At {args.target:g}x resnet50 ({reference:.0f} img/s) '
          f'the whole model may take {budget_us:.1f} us per image.\n')
    print('| model | form | unit | GMACs | x grouped | floor (us) | floor / budget |')
    print('|---|---|---|---|---|---|---|')
    for variant in args.models:
        macs = branch_macs(variant, args.img_size)
        for form, unit in FORMS.items():
            floor_us = 2 * macs[form] / (rates[unit] * 1e12) * 1e6
            print(f'| {variant} | {form} | {unit} | {macs[form] / 1e9:.2f} | {macs[form] / macs["grouped"]:.1f} '
                  f'| {floor_us:.1f} | {floor_us / budget_us:.2f} |')
        floor_us = 2 * macs['other branches'] / (rates['tensor cores'] * 1e12) * 1e6
        print(f'| {variant} | kernel-3 branch (dense) | tensor cores | {macs["other branches"] / 1e9:.2f} | '
              f'| {floor_us:.1f} | {floor_us / budget_us:.2f} |')


if __name__ == '__main__':
    main()
