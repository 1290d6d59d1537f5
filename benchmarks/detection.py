"""Time EPSANet as a detection backbone beside timm's resnet50, at detection resolution, in eval.

For each detector kind and backbone it times the timm backbone alone (`model.backbone.body`) and
the whole torchvision detector (`model(images)`: transform, backbone, FPN, heads, postprocess),
batch `--batch-size` of `--height` x `--width` images (default the paper's 800 shorter side:
800x1333, batch 2). Backbones alternate iteration by iteration, so load on the machine hits them
alike; the median is kept. Weights are random: the heads' work after NMS depends on the scores,
so the detector numbers are for this code, not for a trained model.

`--psa-forms` also times the first-stage PSA (Small and Large) in each branch form at the stride-4
feature map of that resolution and at ImageNet's 56x56, to check the 'auto' plan at both.

    python -m benchmarks.detection                                    # CPU (CUDA if present)
    python -m benchmarks.detection --height 512 --width 853 --kinds faster_rcnn --psa-forms
"""
import argparse
import csv
import datetime
import json
import statistics
from pathlib import Path

import torch

from benchmarks.benchmark import machine_description, timed
from timm_epsanet.detection import DETECTORS, create_detector
from timm_epsanet.epsanet import LARGE_GROUPS, PSA_KERNELS, SMALL_GROUPS
from timm_epsanet.psa import PyramidSqueezeAttention

RESULTS = Path(__file__).parent / 'results'
BRANCH_FORMS = ('auto', 'grouped', 'depthwise', 'volumetric', 'dense')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backbones', nargs='+', default=['epsanet50_small', 'resnet50'])
    parser.add_argument('--kinds', nargs='+', default=list(DETECTORS), choices=DETECTORS)
    parser.add_argument('--height', type=int, default=800)
    parser.add_argument('--width', type=int, default=1333)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (CPU)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--psa-forms', action='store_true', help='also time stage-1 PSA per branch form')
    parser.add_argument('--out', type=Path, default=None,
                        help='results file (default benchmarks/results/detection-<device>.csv)')
    args = parser.parse_args(argv)
    for name in ('height', 'width', 'batch_size', 'iters'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    return args


def alternate(fns, device, iters, warmup):
    """{name: [seconds per iteration]}, the functions called in turn each iteration."""
    samples = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            t = timed(fn, device)
            if i >= warmup:
                samples[name].append(t)
    return samples


@torch.no_grad()
def time_detectors(args, device):
    rows = []
    images = [torch.rand(3, args.height, args.width, device=device) for _ in range(args.batch_size)]
    for kind in args.kinds:
        models = {}
        for backbone in args.backbones:
            # min_size/max_size of the input: the transform normalizes and pads, it does not resize
            models[backbone] = create_detector(
                kind, backbone, min_size=args.height, max_size=max(args.height, args.width)).to(device).eval()
        # the images as the detector's transform hands them to the backbone (padded to /32)
        batch = models[args.backbones[0]].transform(images)[0].tensors
        # the backbone's work is the same under every kind: timed with the first
        for part in ('backbone', 'detector') if kind == args.kinds[0] else ('detector',):
            fns = {
                b: (lambda m=m: m.backbone.body(batch)) if part == 'backbone' else (lambda m=m: m(images))
                for b, m in models.items()}
            samples = alternate(fns, device, args.iters, args.warmup)
            for backbone, s in samples.items():
                median = statistics.median(s)
                rows.append(dict(
                    part=part, kind=kind, backbone=backbone, batch_size=args.batch_size,
                    height=args.height, width=args.width, input=f'{batch.shape[-2]}x{batch.shape[-1]}',
                    median_s=round(median, 4), img_s=round(args.batch_size / median, 3),
                    x_resnet50=None, samples=' '.join(f'{t:.3f}' for t in s)))
                print(rows[-1], flush=True)
        del models
    reference = {(r['part'], r['kind']): r['median_s'] for r in rows if r['backbone'] == 'resnet50'}
    for r in rows:
        if (r['part'], r['kind']) in reference:
            r['x_resnet50'] = round(reference[r['part'], r['kind']] / r['median_s'], 3)
    return rows


@torch.no_grad()
def time_psa_forms(args, device):
    """Stage-1 PSA of Small (64 channels) and Large (128) in each branch form, at the detection
    input's stride-4 map and at 56x56 (a 224 ImageNet image)."""
    stride4 = (-(-args.height // 32) * 8, -(-args.width // 32) * 8)  # the transform pads to /32
    rows = []
    for variant, chs, groups in (('small', 64, SMALL_GROUPS), ('large', 128, LARGE_GROUPS)):
        for size in (stride4, (56, 56)):
            x = torch.rand(args.batch_size, chs, *size, device=device)
            fns = {
                form: PyramidSqueezeAttention(
                    chs, chs, kernel_sizes=PSA_KERNELS, groups=groups, branch_form=form).to(device).eval()
                for form in BRANCH_FORMS}
            samples = alternate({f: (lambda m=m: m(x)) for f, m in fns.items()}, device, args.iters, args.warmup)
            ms = {f: round(1000 * statistics.median(s), 2) for f, s in samples.items()}
            fastest = min((f for f in ms if f != 'auto'), key=ms.get)
            auto_plans = sorted({tuple(b.plan_for(device.type, False)) for b in fns['auto'].modules()
                                 if hasattr(b, 'plan_for')})
            rows.append(dict(variant=variant, chs=chs, size=f'{size[0]}x{size[1]}', batch_size=args.batch_size,
                             ms=ms, fastest=fastest, auto_x_fastest=round(ms['auto'] / ms[fastest], 3),
                             auto_plans=[list(p) for p in auto_plans]))
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_description(device.type)
    date = datetime.date.today().isoformat()
    rows = time_detectors(args, device)
    out = args.out or RESULTS / f'detection-{device.type}.csv'
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], 'iters', 'machine', 'date'])
        writer.writeheader()
        for r in rows:
            writer.writerow(dict(r, iters=args.iters, machine=machine, date=date))
    print(f'wrote {out}')
    if args.psa_forms:
        psa_out = out.with_name(out.stem + '-psa_forms.json')
        psa_out.write_text(json.dumps(
            dict(machine=machine, date=date, iters=args.iters, rows=time_psa_forms(args, device)), indent=1) + '\n')
        print(f'wrote {psa_out}')


if __name__ == '__main__':
    main()
