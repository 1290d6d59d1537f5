"""Where a training or inference step's time goes: the step's wall time against the time the device
was busy, and the kernels that kept it busy.

A step whose device is busy for much less than its wall time is bound by the host (Python, the
dispatcher, kernel launches): faster kernels do not speed it up, fewer launches do. Or it waits
for the device inside the step, where the host cannot run ahead. So the host's time to issue the
passes is measured too (without waiting for the device), and one more step runs in torch's sync
debug mode, which names each line that waited (a training step with a grad scaler waits once, for
its check of the gradients). An inference step is also replayed as one CUDA graph, which takes
the host out: the time a step could reach. On an H200 the first profile found epsanet50_small's
steps with the Triton kernels host-bound while resnet50's were not (benchmarks/README.md, "GPU").

    python benchmarks/step_profile.py --models resnet50 epsanet50_small --json /tmp/step_profile.json
    python benchmarks/step_profile.py --device cpu --img-size 64 --batch-size 2   # dry run of the code path

Steps as benchmark.py's (cuDNN benchmark mode, AMP fp16 on CUDA, bf16 on CPU, channels-last, SGD
with a grad scaler), the models one after another in one process.
"""
import argparse
import collections
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmark import create, make_step, plans_of, timed  # run as a script from benchmarks/
from psa_branches import write_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['resnet50', 'epsanet50_small'])
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--iters', type=int, default=10, help='timed steps (the profiled steps are 3 more)')
    parser.add_argument('--top', type=int, default=8, help='kernels listed per step')
    parser.add_argument('--json', type=Path, default=None, help='write the rows here as they are measured')
    return parser.parse_args(argv)


def graphed_ms(model, x, iters):
    """Milliseconds per inference step replayed as one CUDA graph: the step with no host cost,
    what a host-bound step could reach (or why it could not be captured)."""
    def run():
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.float16):
            model(x)

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture wants
            run()
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        return 1e3 * statistics.median(timed(graph.replay, x.device) for _ in range(iters))
    except Exception as e:  # a step that cannot be captured is a finding, not a crash
        return f'{type(e).__name__}: {e}'.splitlines()[0][:200]


def host_ms(passes, device, iters):
    """Milliseconds the host takes to issue a step's forward (and in training backward) `passes`,
    from an idle GPU and without waiting for it at the end. Near the step's wall time, the step is
    bound by the host; far below it, by the GPU. Without the optimizer's step: its grad scaler
    waits for the GPU (`syncs_in`), which would count the GPU's time as the host's. A GPU that
    falls behind by more launches than its queue holds (about a thousand) also holds the host
    back. (On a CPU the ops run as they are issued: the whole time of the passes.)"""
    cuda = device.type == 'cuda'
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        passes()
        times.append(1e3 * (time.perf_counter() - start))
    if cuda:
        torch.cuda.synchronize(device)
    return statistics.median(times)


def syncs_in(step):
    """{'file:line': count} of the lines where one `step` waited for the GPU (torch's sync debug
    mode: a copy to the host, a stream or device synchronize), most first; or why it could not
    tell (a finding, not a crash: the row's other numbers stand)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode('default')
    except Exception as e:
        return {'not measured': f'{type(e).__name__}: {e}'.splitlines()[0][:200]}
    where = collections.Counter(f'{w.filename}:{w.lineno}' for w in caught if 'synchronizing' in str(w.message))
    return dict(where.most_common())


def profile_step(name, mode, device, args):
    """(wall ms per step, device-busy ms per step, [(kernel, ms per step, launches per step)],
    ms per step as a CUDA graph (inference on CUDA; else None), ms the host takes to issue the
    step's forward and backward (`host_ms`), the lines that waited for the GPU in a step
    (`syncs_in`; CUDA, else None))."""
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = create(name, device=device).to(memory_format=torch.channels_last).train(mode == 'train')
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch_size,), device=device)
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    step, _ = make_step(model, x, target, mode == 'train', amp_dtype)

    for _ in range(3):
        step()
    walls = [1e3 * timed(step, device) for _ in range(args.iters)]
    steps = 3
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    # device kernels (CUDA) or top-level ops (the CPU dry run): their self time is the busy time
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    busy = lambda e: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps  # noqa: E731
    kernels = sorted(((e.key, busy(e), e.count / steps) for e in events), key=lambda k: -k[1])
    total = sum(k[1] for k in kernels) if cuda else float('nan')  # CPU op times nest: no sum
    graph = graphed_ms(model, x, args.iters) if cuda and mode == 'infer' else None
    passes, _ = make_step(model, x, target, mode == 'train', amp_dtype, optimizer_step=False)
    host = host_ms(passes, device, args.iters)
    syncs = syncs_in(step) if cuda else None
    return statistics.median(walls), total, kernels[:args.top], graph, host, syncs


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for mode in args.modes:
        for name in args.models:
            with plans_of(name):
                wall, busy, kernels, graph, host, syncs = profile_step(name, mode, device, args)
            rows.append(dict(model=name, mode=mode, wall_ms=wall, busy_ms=busy, graph_ms=graph, host_ms=host,
                             syncs=syncs,
                             kernels=[dict(name=k, ms=ms, launches=n) for k, ms, n in kernels]))
            graphed = '' if graph is None else (
                f', as a CUDA graph {graph:7.2f} ms' if isinstance(graph, float) else f', no CUDA graph: {graph}')
            issued = '' if host is None else f', the host issues its passes in {host:7.2f} ms'
            print(f'{name:<26} {mode:<5} wall {wall:7.2f} ms/step, device busy {busy:7.2f} ms '
                  f'({busy / wall:.0%}){issued}{graphed}', flush=True)
            for k, ms, n in kernels:
                print(f'    {ms:7.2f} ms {n:5.0f}x  {k[:90]}')
            for where, n in (syncs or {}).items():
                print(f'    waits for the GPU {n}x at {where}' if isinstance(n, int) else f'    waits: {where}, {n}')
            if args.json:
                write_json(args.json, device, args, rows)


if __name__ == '__main__':
    main()
