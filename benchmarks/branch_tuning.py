"""Branch tuning on vs off (`timm_epsanet.set_branch_tuning`): first-use cost and steady throughput.

One model, one process: the first tuned call of each configuration (inference / training x NCHW /
channels-last) pays the measurement, then tuned and untuned iterations alternate (ABAB..., the
order flipped every round) so that load from other processes hits both alike. Writes a JSON after
every configuration (a run cut short keeps what it measured).

    MALLOC_TRIM_THRESHOLD_=1099511627776 MALLOC_MMAP_THRESHOLD_=1073741824 \
        python benchmarks/branch_tuning.py --json benchmarks/results/branch_tuning_cpu.json
    python benchmarks/branch_tuning.py --device cuda --amp --batch-size 128 --layouts channels_last

Untuned is 'auto' as the environment sets it (on CUDA, TIMM_EPSANET_TRITON); the tuner tries the
Triton kernels only where that switch runs them (their compiles would make first use cost minutes).
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import timm
import torch

import timm_epsanet
from timm_epsanet import _branch_plans, _branch_tuning

from benchmark import timed

LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


def step(model, x, train, amp_dtype=None):
    def call():
        with torch.inference_mode(not train), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            y = model(x)
        if train:
            model.zero_grad(set_to_none=True)
            y.float().mean().backward()
    return timed(call, x.device)


def read_plans(cache: str) -> dict:
    """The plans in the tuner's cache file in `cache` (one device: one file)."""
    files = list(Path(cache).glob('*.json'))
    return json.loads(files[0].read_text())['plans'] if files else {}


@contextmanager
def progress(cache: str, known: dict, label: str, every: float):
    """Print, every `every` seconds, how many new PSA plans the cache holds: a first tuned call cut
    short by a time limit (run_cuda.sh's stages) still says how far it got, and how fast."""
    stop, start = threading.Event(), time.perf_counter()

    def report():
        while not stop.wait(every):
            tuned = len(set(read_plans(cache)) - set(known))
            print(f'{label}: {tuned} PSA plans tuned after {time.perf_counter() - start:.1f} s', flush=True)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield
    finally:
        stop.set()
        reporter.join()


def machine_description(device: torch.device, threads: int) -> dict:
    machine = dict(device=_branch_tuning.device_name(device), torch=torch.__version__, python=platform.python_version())
    if device.type == 'cuda':
        machine.update(cudnn=torch.backends.cudnn.version(), triton_candidates=_branch_tuning.triton_candidates(device.type),
                       triton_in_auto=_branch_plans.triton_in_auto())
        if _branch_plans.TRITON_INSTALLED:
            import triton
            machine['triton'] = triton.__version__
    else:
        machine['threads'] = threads
    return machine


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='epsanet50_small')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', action='store_true', help='autocast: fp16 on CUDA, bf16 on CPU')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2, help='CPU threads')
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    parser.add_argument('--layouts', nargs='+', default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument('--json', type=Path, default=None)
    parser.add_argument('--progress-every', type=float, default=5.0,
                        help='seconds between reports of the plans tuned so far during a first tuned call')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as timm's train.py sets it
    else:
        torch.set_num_threads(args.threads)
    amp_dtype = (torch.float16 if device.type == 'cuda' else torch.bfloat16) if args.amp else None
    torch.manual_seed(0)
    cache = tempfile.mkdtemp()  # a cold cache: the first tuned call of each configuration measures
    machine = machine_description(device, args.threads)
    print(machine)
    rows = []
    for mode in args.modes:
        for layout in args.layouts:
            train = mode == 'train'
            model = timm.create_model(args.model).train(train).to(device, memory_format=LAYOUTS[layout])
            x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
            x = x.contiguous(memory_format=LAYOUTS[layout])
            timm_epsanet.set_branch_tuning(False)
            step(model, x, train, amp_dtype)  # warm-up
            off_first = step(model, x, train, amp_dtype)
            timm_epsanet.set_branch_tuning(True, cache_dir=cache)
            known = read_plans(cache)
            with progress(cache, known, f'{mode} {layout}', args.progress_every):
                first = step(model, x, train, amp_dtype)  # measures every PSA shape of this configuration
            print(f'{mode} {layout}: first tuned call {first:.2f} s', flush=True)
            times = {False: [off_first], True: []}
            for r in range(args.rounds):
                for tuned in ((False, True) if r % 2 else (True, False)):
                    timm_epsanet.set_branch_tuning(tuned, cache_dir=cache)
                    times[tuned].append(step(model, x, train, amp_dtype))
            timm_epsanet.set_branch_tuning(False)
            off, on = (statistics.median(times[t]) for t in (False, True))
            row = dict(
                mode=mode, layout=layout, batch=args.batch_size, first_tuned_call_s=first,
                first_use_cost_s=first - on, off_median_s=off, on_median_s=on,
                off_min_s=min(times[False]), on_min_s=min(times[True]),
                speedup_median=off / on, speedup_min=min(times[False]) / min(times[True]),
                off_s=times[False], on_s=times[True])
            row['load_average_1min_after'] = os.getloadavg()[0]  # other processes on the machine
            plans = read_plans(cache)
            # the forms of the PSA plans this configuration measured
            row['forms'] = dict(Counter(form for key, plan in plans.items() if key not in known for form, _ in plan))
            rows.append(row)
            print(f'{mode} {layout}: first tuned call {first:.2f} s (cost {first - on:.2f} s); '
                  f'img/s off {args.batch_size / off:.2f} on {args.batch_size / on:.2f} (median, x{off / on:.3f}); '
                  f'min x{row["speedup_min"]:.3f}; load {row["load_average_1min_after"]:.1f}; forms {row["forms"]}; '
                  f'off {[round(t, 3) for t in times[False]]} on {[round(t, 3) for t in times[True]]}', flush=True)
            if args.json:
                args.json.write_text(json.dumps(dict(machine=machine, args=vars(args) | dict(json=str(args.json)),
                                                     rows=rows, plans=plans), indent=1))


if __name__ == '__main__':
    main()
