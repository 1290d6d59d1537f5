"""Branch tuning on vs off (`timm_epsanet.set_branch_tuning`): first-use cost and steady throughput.

One model, one process: the first tuned call of each configuration (inference / training x NCHW /
channels-last) pays the measurement, then tuned and untuned iterations alternate (ABAB..., the
order flipped every round) so that load from other processes hits both alike. Writes a JSON.

    MALLOC_TRIM_THRESHOLD_=1099511627776 MALLOC_MMAP_THRESHOLD_=1073741824 \
        python benchmarks/branch_tuning.py --json benchmarks/results/branch_tuning_cpu.json
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import timm_epsanet
from timm_epsanet import _branch_tuning

LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


def step(model, x, train):
    start = time.perf_counter()
    if train:
        model.zero_grad(set_to_none=True)
        model(x).mean().backward()
    else:
        with torch.inference_mode():
            model(x)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='epsanet50_small')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    parser.add_argument('--layouts', nargs='+', default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument('--json', type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cache = tempfile.mkdtemp()  # a cold cache: the first tuned call of each configuration measures
    machine = dict(cpu=_branch_tuning.device_name(torch.device('cpu')), threads=args.threads,
                   torch=torch.__version__, python=platform.python_version())
    print(machine)
    rows = []
    for mode in args.modes:
        for layout in args.layouts:
            train = mode == 'train'
            model = timm.create_model(args.model).train(train).to(memory_format=LAYOUTS[layout])
            x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(memory_format=LAYOUTS[layout])
            timm_epsanet.set_branch_tuning(False)
            step(model, x, train)  # warm-up
            off_first = step(model, x, train)
            timm_epsanet.set_branch_tuning(True, cache_dir=cache)
            first = step(model, x, train)  # measures every PSA shape of this configuration
            times = {False: [off_first], True: []}
            for r in range(args.rounds):
                for tuned in ((False, True) if r % 2 else (True, False)):
                    timm_epsanet.set_branch_tuning(tuned, cache_dir=cache)
                    times[tuned].append(step(model, x, train))
            timm_epsanet.set_branch_tuning(False)
            off, on = (statistics.median(times[t]) for t in (False, True))
            row = dict(
                mode=mode, layout=layout, batch=args.batch_size, first_tuned_call_s=first,
                first_use_cost_s=first - on, off_median_s=off, on_median_s=on,
                off_min_s=min(times[False]), on_min_s=min(times[True]),
                speedup_median=off / on, speedup_min=min(times[False]) / min(times[True]),
                off_s=times[False], on_s=times[True])
            row['load_average_1min_after'] = os.getloadavg()[0]  # other processes on the machine
            rows.append(row)
            print(f'{mode} {layout}: first tuned call {first:.2f} s (cost {first - on:.2f} s); '
                  f'img/s off {args.batch_size / off:.2f} on {args.batch_size / on:.2f} (median, x{off / on:.3f}); '
                  f'min x{row["speedup_min"]:.3f}; load {row["load_average_1min_after"]:.1f}; off {[round(t, 2) for t in times[False]]} on {[round(t, 2) for t in times[True]]}',
                  flush=True)
    if args.json:
        plans = json.loads(next(Path(cache).glob('*.json')).read_text())['plans']
        args.json.write_text(json.dumps(dict(machine=machine, args=vars(args) | dict(json=str(args.json)),
                                             rows=rows, plans=plans), indent=1))


if __name__ == '__main__':
    main()
