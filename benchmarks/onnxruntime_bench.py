""" Inference speed of the ONNX exports in onnxruntime (CPU), against resnet50's export.

Each model is exported with both of torch's exporters: TorchScript (`dynamo=False`, what timm's
onnx_export.py uses) and dynamo. Sessions are measured round-robin `--repeats` times, keeping the
best (other load on the machine only ever slows a run down). Writes `<out>/onnxruntime-cpu.csv`,
one row per (model, exporter) with its ratio to resnet50 from the same exporter, and prints it.

    python -m benchmarks.onnxruntime_bench                       # epsanet50_small, resnet50
    python -m benchmarks.onnxruntime_bench --models epsanet50_small epsanet50_large resnet50
    python -m benchmarks.onnxruntime_bench --models epsanet50_small epsanet50_small@grouped resnet50
"""
import argparse
import csv
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch

import timm_epsanet  # noqa: F401
from benchmarks.benchmark import create
from timm_epsanet._branch_tuning import cpu_model

EXPORTERS = ('torchscript', 'dynamo')
REFERENCE = 'resnet50'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['epsanet50_small', REFERENCE])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2, help='onnxruntime intra-op threads')
    parser.add_argument('--iters', type=int, default=5, help='timed batches per repeat')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--out', type=Path, default=Path(__file__).parent / 'results')
    args = parser.parse_args(argv)
    if REFERENCE not in args.models:
        parser.error(f'--models must include {REFERENCE}, the reference of the ratios')
    return args


def export(name: str, exporter: str, path: Path, img_size: int) -> Path:
    model = create(name).eval()  # timm names, and benchmark.py's @form suffixes
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        if exporter == 'dynamo':
            torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['input0'],
                              output_names=['output0'], dynamic_axes={'input0': {0: 'batch'}, 'output0': {0: 'batch'}})
    return path


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def images_per_second(sess: onnxruntime.InferenceSession, x: np.ndarray, iters: int) -> float:
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        sess.run(None, feed)
    return iters * x.shape[0] / (time.perf_counter() - start)


def main(argv=None):
    args = parse_args(argv)
    load = os.getloadavg()[0]  # other work on the machine: these ratios are only as good as it is quiet
    x = np.random.default_rng(0).standard_normal((args.batch_size, 3, args.img_size, args.img_size), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {
            (name, exporter): session(export(name, exporter, Path(tmp) / f'{name}-{exporter}.onnx', args.img_size),
                                      args.threads)
            for name in args.models for exporter in EXPORTERS}
        best = dict.fromkeys(sessions, 0.0)
        for _ in range(args.repeats):
            for key, sess in sessions.items():
                best[key] = max(best[key], images_per_second(sess, x, args.iters))
    machine = (f'{cpu_model()}, {torch.get_num_threads()} torch threads, onnxruntime {onnxruntime.__version__} '
               f'({args.threads} threads), torch {torch.__version__}, timm {timm.__version__}, '
               f'load average {load:.1f} at start')
    date = datetime.date.today().isoformat()
    rows = [dict(model=name, exporter=exporter, batch_size=args.batch_size, img_size=args.img_size,
                 img_s=round(img_s, 2), x_resnet50=round(img_s / best[REFERENCE, exporter], 3),
                 machine=machine, date=date, repeats=args.repeats)
            for (name, exporter), img_s in best.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / 'onnxruntime-cpu.csv'
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f'{row["model"]:>18} {row["exporter"]:>11}: {row["img_s"]:7.2f} img/s, {row["x_resnet50"]:.3f}x resnet50')
    print(f'Machine: {machine}; {date}; written to {path}')


if __name__ == '__main__':
    main()
