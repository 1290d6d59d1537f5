"""Activation memory of a CUDA AMP training step, counted without a GPU, as a ratio to resnet50.

A GPU's training peak is mostly the activations autograd saves in the forward pass for the
backward; the rest is weights, gradients, optimizer state and what the backend adds (cuDNN
workspaces, allocator rounding). The saved activations do not depend on the machine, only on the
ops the model runs and their dtypes, so they can be counted anywhere: here the model runs on fake
CUDA tensors (shapes and dtypes only, no data, no GPU) under CUDA autocast fp16, the way
`benchmark.py --device cuda --precisions amp` trains it, and every tensor autograd saves is
counted once. CUDA autocast's dtype rules apply (its fp32 ops, such as softmax, included), which
is why this is not run on CPU or under CPU autocast, whose rules differ. Each PSA branch runs
as CUDA training runs it without the Triton kernels (the grouped conv; the kernels save the same
two tensors). Comparing with `benchmark.py`'s CUDA `peak_mib` separates the model's own
memory from the backend's.

    python -m benchmarks.training_memory                  # batch 128, 224x224, the peers too
    python -m benchmarks.training_memory --models epsanet50_small --out benchmarks/results/training-memory.csv
"""
import argparse
import csv
import datetime
from pathlib import Path

import torch

from benchmarks.benchmark import REFERENCE, create

DEFAULT_MODELS = [REFERENCE, 'seresnet50', 'resnext50_32x4d', 'res2net50_26w_4s', 'skresnet50',
                  'epsanet50_small', 'epsanet50_large', 'epsanet101_small', 'epsanet101_large']


class _CudaAutocast:
    """CUDA autocast switched on directly: `torch.autocast('cuda')` refuses to start without a GPU,
    but its dtype rules are dispatch rules, which fake CUDA tensors go through all the same."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.prev = torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')
        torch.set_autocast_dtype('cuda', self.dtype)
        torch.set_autocast_enabled('cuda', True)
        torch.autocast_increment_nesting()

    def __exit__(self, *exc):
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled('cuda', self.prev[0])
        torch.set_autocast_dtype('cuda', self.prev[1])


def saved_activation_bytes(name: str, batch_size: int = 128, img_size: int = 224,
                           amp_dtype: torch.dtype = torch.float16) -> int:
    """Bytes of the tensors autograd saves in one training forward of `name` on CUDA under autocast
    (channels-last input), each storage counted once, parameters excluded."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = create(name, device='cuda').train()
        params = {id(p.untyped_storage()) for p in model.parameters()}
        saved = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if id(storage) not in params:
                saved[id(storage)] = storage  # kept alive, so that no id is reused while counting
            return t

        x = torch.empty(batch_size, 3, img_size, img_size, device='cuda', memory_format=torch.channels_last)
        with _CudaAutocast(amp_dtype), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storage.nbytes() for storage in saved.values())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS, help='timm names, EPSANet with @form suffixes')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default='float16')
    parser.add_argument('--out', type=Path, default=None, help='CSV to write (default: print only)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    models = [REFERENCE] + [m for m in args.models if m != REFERENCE]
    rows, reference = [], None
    for name in models:
        size = saved_activation_bytes(name, args.batch_size, args.img_size, getattr(torch, args.amp_dtype))
        reference = reference or size
        rows.append({'model': name, 'amp_dtype': args.amp_dtype, 'batch_size': args.batch_size,
                     'img_size': args.img_size, 'saved_mib': round(size / 2 ** 20, 1),
                     'x_resnet50': round(size / reference, 3)})
    machine = f'CUDA autocast on fake tensors (no GPU; machine-independent), torch {torch.__version__}'
    date = datetime.date.today().isoformat()
    print(f'Activations saved for backward, CUDA AMP {args.amp_dtype}, channels-last, batch {args.batch_size}, '
          f'{args.img_size}x{args.img_size}; {machine}; {date}\n')
    print('| model | saved activations (MiB) | x resnet50 |\n|---|---|---|')
    for row in rows:
        print(f'| {row["model"]} | {row["saved_mib"]:.0f} | {row["x_resnet50"]:.2f} |')
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ['machine', 'date'])
            writer.writeheader()
            writer.writerows(dict(row, machine=machine, date=date) for row in rows)
        print(f'\nwritten to {args.out}')
    return rows


if __name__ == '__main__':
    main()
