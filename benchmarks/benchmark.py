"""Throughput and peak memory of the EPSANet variants beside timm's ResNet-50 family, in one run.

On CPU every configuration (model x inference/training x layout x precision x eager/compiled)
runs in a fresh subprocess, so allocator state and peak memory do not leak between them; on CUDA,
where peak memory is read from the allocator, one subprocess per model runs its configurations.
Configurations are measured round-robin `--repeats` times, keeping the best (other load on the machine only ever
slows a run down, so the fastest repeat is the least disturbed).
Writes `<out>/<name>.csv` (one row per configuration, with its ratio to resnet50 in the same
configuration and the machine line) and `<out>/<name>.png`, named as timm names its results:
`benchmark-cpu.csv`, `benchmark-cuda-h200.csv`, ...; prints the table in Markdown.

    python benchmarks/benchmark.py                       # fp32, NCHW + channels_last, eager
    python benchmarks/benchmark.py --precisions fp32 amp --compile   # + AMP (bf16 CPU, fp16 CUDA), torch.compile
    python benchmarks/benchmark.py --models epsanet50_small resnet50 --modes infer
    python benchmarks/benchmark.py --malloc-keep         # glibc keeps freed memory: no page faults
    python benchmarks/benchmark.py --merge a.csv b.csv   # one report from runs on the same machine

Each row also records the process's minor page faults per iteration. With glibc's default malloc,
memory of freed large tensors goes back to the OS and every iteration faults it in again, which
costs each model a different share of its time (benchmarks/README.md), so `--malloc-keep`
measures the same configurations without it (a separate machine line in the results).

Why this script and not timm's own benchmark.py: benchmarks/README.md.

Model names are timm names, optionally with a suffix for EPSANet: `@official` (every PSA runs the
official code's forward structure, see timm_epsanet/_official.py), or a PSA branch form that applies
on every device instead of the per-device default: `@grouped`, `@depthwise`, `@volumetric`, `@dense`,
`@regrouped`, `@triton` or `@triton_mma` (see timm_epsanet._branch_conv.BranchConv2d), or `@cudnn`:
'auto' as it runs without the Triton kernels (TIMM_EPSANET_TRITON=0), in a run that has them on;
`@cudnn+attention`: the branches so, the attention on its kernels (TIMM_EPSANET_TRITON=attention).
"""
import argparse
import csv
import datetime
import difflib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

EPSANETS = ['epsanet50_small', 'epsanet50_large', 'epsanet101_small', 'epsanet101_large']
BASELINES = ['resnet50', 'seresnet50', 'ecaresnet50t', 'skresnet50', 'res2net50_26w_4s']
# EPSANet-50 Small computed the way the official code computes it (same weights)
OFFICIAL = 'epsanet50_small@official'
REFERENCE = 'resnet50'
# a configuration's columns in the CSV, then what a measurement adds to it
CONFIG_KEYS = ['model', 'mode', 'layout', 'precision', 'compile', 'device', 'batch_size', 'img_size', 'iters',
               'warmup', 'threads']
RESULT_KEYS = ['img_s', 'x_resnet50', 'peak_mib', 'faults', 'samples', 'error']
RUN_KEYS = ['machine', 'date', 'repeats']
# --malloc-keep: glibc keeps freed memory instead of returning it to the OS (and faulting it in again)
MALLOC_KEEP_ENV = {'MALLOC_TRIM_THRESHOLD_': str(2 ** 40), 'MALLOC_MMAP_THRESHOLD_': str(2 ** 30)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=EPSANETS + [OFFICIAL] + BASELINES)
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    parser.add_argument('--layouts', nargs='+', default=['nchw', 'channels_last'], choices=['nchw', 'channels_last'])
    parser.add_argument('--precisions', nargs='+', default=['fp32'], choices=['fp32', 'amp', 'amp_bf16'],
                        help='amp: autocast, bf16 on CPU, fp16 on CUDA; amp_bf16: autocast to bf16 everywhere')
    parser.add_argument('--compile', action='store_true', help='also measure torch.compile')
    parser.add_argument('--eager', action=argparse.BooleanOptionalAction, default=True,
                        help='--no-eager: with --compile, measure compiled configurations only')
    parser.add_argument('--compile-models', nargs='+', default=None,
                        help='measure compiled configurations for these models only (default: all)')
    parser.add_argument('--batch-size', type=int, default=None, help='default 8 on CPU, 128 on CUDA')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--iters', type=int, default=None, help='timed iterations (default 6 CPU, 30 CUDA)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=1, help='round-robin repeats, best kept')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: all cores)')
    parser.add_argument('--malloc-keep', action='store_true',
                        help='glibc: keep freed memory in the process (no trimming, no mmap per large tensor), '
                             'so that page faults do not count; a separate machine setting in the report')
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parent / 'results',
                        help='folder of the results')
    parser.add_argument('--name', default=None,
                        help='file name of the results, without extension (default: benchmark-<device>, '
                             'e.g. benchmark-cpu, benchmark-cuda-h200; -malloc_keep appended with --malloc-keep)')
    parser.add_argument('--one-process', action='store_true',
                        help='CUDA: measure every configuration in one process (saves start-up time)')
    parser.add_argument('--merge', nargs='+', type=Path, default=None, metavar='CSV',
                        help='measure nothing: write one report from these result files (same machine)')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def timed(fn, device) -> float:
    """Seconds one call of `fn` takes, with CUDA's queue drained before and after."""
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


# model suffixes that run 'auto' under other switches than the run's (TIMM_EPSANET_TRITON=1 in
# run_cuda.sh): the branches' Triton kernels, and the attention's, on or off
PLAN_SUFFIXES = {
    'cudnn': dict(TRITON_IN_AUTO=False, TRITON_ATTENTION_IN_AUTO=False),  # cuDNN and plain ops throughout
    'cudnn+attention': dict(TRITON_IN_AUTO=False, TRITON_ATTENTION_IN_AUTO=True),  # the attention's kernels alone
}


def model_name_error(name) -> Optional[str]:
    """What is wrong with a `--models` name (a timm model, optionally with an EPSANet suffix), or None."""
    import timm
    import timm_epsanet  # noqa: F401  (explicit registration, also when the autoload is off)
    from timm_epsanet._branch_conv import BRANCH_FORMS
    base, _, form = name.partition('@')
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        return f'{name}: timm has no model {base!r}' + (f' (did you mean {", ".join(close)}?)' if close else '')
    if form not in ('', 'official') + tuple(PLAN_SUFFIXES) + BRANCH_FORMS[1:]:
        return f'{name}: unknown model form @{form}: use @official, ' + ', '.join(
            '@' + f for f in list(PLAN_SUFFIXES) + list(BRANCH_FORMS[1:]))
    return None


def create(name, **kwargs):
    import timm
    from timm_epsanet._branch_conv import BRANCH_FORMS
    error = model_name_error(name)
    if error:
        raise ValueError(error)
    name, _, form = name.partition('@')
    if form in BRANCH_FORMS[1:]:
        kwargs['block_args'] = dict(psa_branch_form=form)
    model = timm.create_model(name, **kwargs)
    if form == 'official':
        from timm_epsanet._official import to_official_structure
        model = to_official_structure(model)
    return model


@contextmanager
def plans_of(name):
    """While `name` runs: with '@cudnn', 'auto' without the Triton kernels even where
    TIMM_EPSANET_TRITON=1; with '@cudnn+attention', only the attention's (=attention). One process
    may run several models: restored afterwards."""
    from timm_epsanet import _branch_plans
    switches = PLAN_SUFFIXES.get(name.partition('@')[2], {})
    saved = {key: getattr(_branch_plans, key) for key in switches}
    run_has_kernels = _branch_plans.TRITON_IN_AUTO or _branch_plans.TRITON_ATTENTION_IN_AUTO
    for key, on in switches.items():  # only what the run has: without TIMM_EPSANET_TRITON, every kernel off
        setattr(_branch_plans, key, on and run_has_kernels)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(_branch_plans, key, value)


def measure(cfg):
    """One configuration, in this process. Returns img/s and peak memory in MiB."""
    with plans_of(cfg['model']):
        return _measure(cfg)


def _measure(cfg):
    import torch
    if cfg['threads']:
        torch.set_num_threads(cfg['threads'])
    device = torch.device(cfg['device'])
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cudnn.benchmark = True  # as timm's train.py, validate.py and benchmark.py set it
        torch.cuda.empty_cache()
    train = cfg['mode'] == 'train'
    baseline_mib = _current_rss_mib()
    model = create(cfg['model'], device=device)
    x = torch.randn(cfg['batch_size'], 3, cfg['img_size'], cfg['img_size'], device=device)
    target = torch.randint(0, 1000, (cfg['batch_size'],), device=device)
    if cfg['layout'] == 'channels_last':
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train(train)
    amp_dtype = {'amp': torch.float16 if cuda else torch.bfloat16, 'amp_bf16': torch.bfloat16}.get(cfg['precision'])
    step, step_model = make_step(model, x, target, train, amp_dtype, cfg['compile'])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(cfg['warmup']):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cfg['iters']):
        times.append(timed(step, device))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / cfg['iters']
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        # process peak (KiB on Linux) minus what the process held before the model existed
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mib
    del model, step_model, step
    torch._dynamo.reset()  # the next configuration of this process compiles afresh
    return dict(img_s=cfg['batch_size'] / statistics.median(times), peak_mib=peak_mib, faults=faults)


def make_step(model, x, target, train, amp_dtype, compile=False, optimizer_step=True):
    """One benchmark step of `model` and the model it runs (compiled or not): inference, or a
    training step of SGD with momentum and, for fp16 on CUDA, a grad scaler (without
    `optimizer_step`: its forward and backward passes alone)."""
    import torch
    step_model = torch.compile(model) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if train and optimizer_step else None
    scaler = None if optimizer is None else torch.amp.GradScaler(enabled=x.is_cuda and amp_dtype == torch.float16)

    def step():
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if not train:
                with torch.inference_mode() if not compile else torch.no_grad():
                    return step_model(x)
            loss = torch.nn.functional.cross_entropy(step_model(x), target)
        if optimizer is None:
            model.zero_grad(set_to_none=True)
            return loss.backward()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step, step_model


def _current_rss_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def configurations(args, device):
    compiles = ([False] if args.eager or not args.compile else []) + ([True] if args.compile else [])
    cuda = device == 'cuda'
    for mode in args.modes:
        for layout in args.layouts:
            for precision in args.precisions:
                for compiled in compiles:
                    for model in args.models:
                        if compiled and args.compile_models is not None and model not in args.compile_models:
                            continue
                        yield dict(
                            model=model, mode=mode, layout=layout, precision=precision, compile=compiled,
                            device=device, batch_size=args.batch_size or (128 if cuda else 8),
                            img_size=args.img_size, iters=args.iters or (30 if cuda else 6),
                            warmup=args.warmup + (3 if compiled else 0), threads=args.threads)


def run_worker(cfgs, env_extra=None):
    """Measure `cfgs` in order in one fresh process, yielding each result as soon as it is measured;
    a crash fails the configurations it did not finish."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', **(env_extra or {}))
    with subprocess.Popen([sys.executable, __file__, '--worker', json.dumps(cfgs)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env) as proc:
        done = 0
        for line in proc.stdout:
            if line.startswith('{'):
                done += 1
                yield json.loads(line)
        stderr = proc.stderr.read()
    if done < len(cfgs):
        tail = stderr.strip().splitlines()[-1:] or [f'exit code {proc.returncode}, no output']
        for _ in range(len(cfgs) - done):
            yield dict(error=tail[0][:200])


def worker(cfgs):
    for cfg in cfgs:
        try:
            res = measure(cfg)
        except Exception as e:  # reported in the table; the other configurations still run
            res = dict(error=f'{type(e).__name__}: {e}'.splitlines()[0][:200])
        print(json.dumps(res), flush=True)


def batches(cfgs, device, one_process=False):
    """Indices of the configurations each worker process measures: one per process on CPU, one
    model per process (or all in one) on CUDA."""
    if device != 'cuda':
        return [[i] for i in range(len(cfgs))]
    if one_process:
        return [list(range(len(cfgs)))]
    by_model = {}
    for i, cfg in enumerate(cfgs):
        by_model.setdefault(cfg['model'], []).append(i)
    return list(by_model.values())


def key(cfg):
    """What a ratio to resnet50 holds equal: a model is compared only with resnet50 run alike."""
    return (cfg['mode'], cfg['layout'], cfg['precision'], cfg['compile'], cfg['batch_size'], cfg['img_size'])


def machine_description(device, malloc_keep=False):
    import torch
    from timm_epsanet._branch_tuning import cpu_model  # the name branch tuning keys its plans by
    if device == 'cuda':
        desc = f'{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}'
        try:  # the Triton kernels' compiler, read without importing it
            desc += f', triton {importlib.metadata.version("triton")}'
        except importlib.metadata.PackageNotFoundError:
            desc += ', no triton'
    else:
        desc = (f'{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, '
                f'torch {torch.__version__}')
    if malloc_keep:
        desc += ', glibc malloc keeping freed memory (' + ' '.join(f'{k}={v}' for k, v in MALLOC_KEEP_ENV.items()) + ')'
    return desc


def default_name(device, malloc_keep=False):
    """benchmark-cpu, benchmark-cuda-h200, ...: timm's `results/benchmark-*.csv` naming."""
    name = 'benchmark-' + device
    if device == 'cuda':
        import torch
        gpu = torch.cuda.get_device_name().lower().replace('nvidia', '').split()
        name += '-' + '-'.join(gpu)
    return name + ('-malloc_keep' if malloc_keep else '')


def markdown_table(results, machine, date, repeats):
    cfg0 = results[0][0]
    # a merged report may hold several batch sizes: then each row names its own
    batches = len({c['batch_size'] for c, _ in results}) > 1
    batch = '' if batches else f'batch {cfg0["batch_size"]}, '
    lines = [
        f'Machine: {machine}; {date}; {batch}{cfg0["img_size"]}x{cfg0["img_size"]}, '
        f'median of {cfg0["iters"]} iterations, best of {repeats} repeat(s).',
        '',
        '| model | mode | layout | precision | compiled | ' + ('batch | ' if batches else '')
        + 'img/s | x resnet50 | peak memory (MiB) [1] | page faults / iter [2] |',
        '|---|---|---|---|---|' + ('---|' if batches else '') + '---|---|---|---|',
    ]
    for cfg, res in results:
        head = f'| {cfg["model"]} | {cfg["mode"]} | {cfg["layout"]} | {cfg["precision"]} | {cfg["compile"]} | '
        head += f'{cfg["batch_size"]} | ' if batches else ''
        if 'error' in res:
            lines.append(head + f'failed: {res["error"]} | | | |')
            continue
        faults = f'{res["faults"]:.0f}' if res.get('faults') is not None else 'not recorded'
        lines.append(head + f'{res["img_s"]:.1f} | {res["x_resnet50"]:.2f} | {res["peak_mib"]:.0f} | {faults} |')
    lines += ['', '[1] CUDA: peak allocated; CPU: peak RSS of the process minus its RSS before the model was built.',
              '[2] Minor page faults of the process per timed iteration (of the fastest repeat): memory the allocator '
              'returned to the OS and touched again; on CPU each costs time inside the ops (see --malloc-keep).']
    return '\n'.join(lines) + '\n'


def write_report(results, machine, repeats, path: Path, date=None, with_plot=True):
    """Write `path` (.csv) and its plot (.png); return the Markdown table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')
    reference = {key(c): r['img_s'] for c, r in results if c['model'] == REFERENCE and 'img_s' in r}
    for cfg, res in results:
        if 'img_s' in res:
            res['x_resnet50'] = res['img_s'] / reference[key(cfg)] if key(cfg) in reference else float('nan')
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, CONFIG_KEYS + RESULT_KEYS + RUN_KEYS)
        writer.writeheader()
        for cfg, res in results:
            row = dict(cfg, **res, machine=machine, date=date, repeats=repeats)
            row['samples'] = ' '.join(f'{s:.2f}' for s in res.get('samples', []))
            writer.writerow({k: _csv_value(row.get(k)) for k in writer.fieldnames})
    table = markdown_table(results, machine, date, repeats)
    if with_plot:
        plot(results, reference, path.with_suffix('.png'), table.splitlines()[0])
    return table


def _csv_value(value):
    if isinstance(value, float):
        return f'{value:.6g}' if value == value else ''
    return '' if value is None else value


def read_results(path: Path):
    """(cfg, result) pairs and the run's machine, date and repeats from a results CSV."""
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f'{path}: cannot be read as a results CSV ({e})')
    if not rows:
        raise SystemExit(f'{path}: no rows')
    missing = [k for k in CONFIG_KEYS + RESULT_KEYS + RUN_KEYS if k not in rows[0]]
    if missing:
        raise SystemExit(f'{path}: not a results CSV of this script (no column {", ".join(missing)})')
    results = []
    for row in rows:
        cfg = {k: row[k] for k in CONFIG_KEYS}
        cfg['compile'] = cfg['compile'] == 'True'
        for k in ('batch_size', 'img_size', 'iters', 'warmup'):
            cfg[k] = int(cfg[k])
        cfg['threads'] = int(cfg['threads']) if cfg['threads'] else None
        if row['error']:
            res = dict(error=row['error'])
        else:
            res = dict(img_s=float(row['img_s']), peak_mib=float(row['peak_mib']),
                       faults=float(row['faults']) if row['faults'] else None,
                       samples=[float(s) for s in row['samples'].split()] or [float(row['img_s'])])
        results.append((cfg, res))
    return results, {k: rows[0][k] for k in RUN_KEYS}


def plot(results, reference, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    groups = sorted({key(c) for c, _ in results}, key=lambda k: [str(v) for v in k])
    models = list(dict.fromkeys(c['model'] for c, _ in results))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        ratios = []
        for g in groups:
            r = [res['img_s'] / reference[g] for c, res in results
                 if c['model'] == model and key(c) == g and 'img_s' in res and g in reference]
            ratios.append(r[0] if r else 0.0)
        ax.bar([j + i * width for j in range(len(groups))], ratios, width, label=model)
    ax.axhline(1.0, color='black', linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(['\n'.join([g[0], g[1], g[2], 'compiled' if g[3] else 'eager', f'batch {g[4]}'])
                        for g in groups])
    ax.set_ylabel('throughput relative to resnet50')
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths, out: Path):
    """One report (`out`, a .csv) from the results of several runs of the same code on the same
    machine (e.g. more repeats of some configurations, or other precisions)."""
    runs = [read_results(Path(p)) for p in paths]
    machines = {run['machine'] for _, run in runs}
    if len(machines) != 1:
        raise SystemExit(f'refusing to merge runs from different machines: {sorted(machines)}')
    # a configuration measured by several runs keeps its fastest measurement, as repeats do
    merged = {}
    for cfg, res in (pair for results, _ in runs for pair in results):
        ident = json.dumps(cfg, sort_keys=True)
        merged[ident] = (cfg, combine(merged[ident][1], res) if ident in merged else res)
    # a merged report's repeats read e.g. '1-2': merging it again keeps every count
    repeats = sorted({int(r) for _, run in runs for r in str(run['repeats']).split('-')})
    dates = sorted({run['date'] for _, run in runs})
    date = dates[0] if len(dates) == 1 else f'{dates[0]} to {dates[-1]}'
    return write_report(list(merged.values()), machines.pop(), '-'.join(map(str, repeats)), out, date)


def combine(a, b):
    """Two measurements of one configuration: the faster one, with the samples of both (an error
    only where neither ran)."""
    ok = [r for r in (a, b) if 'img_s' in r]
    if not ok:
        return a
    best = dict(max(ok, key=lambda r: r['img_s']))
    best['samples'] = [s for r in ok for s in r.get('samples', [r['img_s']])]
    best['peak_mib'] = max(r['peak_mib'] for r in ok)
    best.pop('x_resnet50', None)
    return best


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.merge:
        print(merge(args.merge, args.out / f'{args.name or args.merge[0].stem}.csv'))
        return
    errors = [e for e in map(model_name_error, args.models) if e]
    if errors:  # before minutes of measuring the others
        raise SystemExit('benchmark.py --models: ' + '; '.join(errors))
    import torch
    import timm
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cfgs = list(configurations(args, device))
    machine = f'{machine_description(device, args.malloc_keep)}, timm {timm.__version__}'
    path = args.out / f'{args.name or default_name(device, args.malloc_keep)}.csv'
    env_extra = MALLOC_KEEP_ENV if args.malloc_keep else None
    samples = {i: [] for i in range(len(cfgs))}
    for repeat in range(args.repeats):
        for batch in batches(cfgs, device, args.one_process):
            for i, res in zip(batch, run_worker([cfgs[i] for i in batch], env_extra)):
                samples[i].append(res)
                shown = f'{res["img_s"]:.1f} img/s' if 'img_s' in res else res['error']
                print(f'[{repeat + 1}/{args.repeats}] {cfgs[i]["model"]:<26} {" ".join(map(str, key(cfgs[i]))):<36} '
                      f'{shown}', flush=True)
                # what is measured so far survives an interrupted run
                write_report(best_of(cfgs, samples), machine, repeat + 1, path, with_plot=False)
    print()
    print(write_report(best_of(cfgs, samples), machine, args.repeats, path))
    print(f'written: {path}')


def best_of(cfgs, samples):
    """(cfg, result) of every configuration measured so far: the fastest repeat, or the error."""
    results = []
    for i, cfg in enumerate(cfgs):
        ok = [s for s in samples[i] if 'img_s' in s]
        if ok:
            fastest = max(ok, key=lambda s: s['img_s'])
            results.append((cfg, dict(img_s=fastest['img_s'], peak_mib=max(s['peak_mib'] for s in ok),
                                      faults=fastest['faults'], samples=[round(s['img_s'], 2) for s in ok])))
        elif samples[i]:
            results.append((cfg, samples[i][0]))
    return results


if __name__ == '__main__':
    main()
