"""What one `run_cuda.sh` run decides: the issue's targets, then each open choice of
benchmarks/README.md's "What the next run decides", read off the run's results, with the numbers
behind it and the change it calls for.

A session with a GPU has one run of minutes; this reads that run the same way every time, from
the files it leaves (a stage that did not finish is "not measured", never a guess). It changes no
code: each decision names what to change and where.

    python benchmarks/cuda_decisions.py /tmp/cuda            # the run's folder: COPY_DIR's flat files and run.log, or OUT_DIR
    python benchmarks/cuda_decisions.py /tmp/cuda --previous benchmarks/results/benchmark-cuda-h200.csv
"""
import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import read_results  # noqa: E402

REFERENCE = 'resnet50'
SMALL = 'epsanet50_small'  # with the Triton kernels: run_cuda.sh sets TIMM_EPSANET_TRITON=1
CUDNN = SMALL + '@cudnn'  # 'auto' without them: today's default
LARGE, LARGE_CUDNN = 'epsanet50_large', 'epsanet50_large@cudnn'
PEERS_TO_BEAT = ('res2net50_26w_4s', 'skresnet50')
TARGETS = {'infer': 0.8, 'train': 0.75}  # x resnet50, epsanet50_small, AMP fp16, batch 128
MEMORY_TARGET = 1.1  # training peak memory x resnet50's
NOISE = 0.02  # a difference in throughput below this share decides nothing
TILE_FIELDS = ('block_p', 'block_g', 'block_r', 'block_o', 'num_warps', 'block_t', 'num_stages',
               'stack_branches', 'pair_taps', 'tile_w')  # _triton_branch.Config, in order
FIRST_USE_LIMIT_S = 10.0  # branch tuning's first use should cost seconds


@dataclass
class Decision:
    choice: str  # the open choice: a row of the README's table
    verdict: str  # what the numbers call for
    evidence: List[str] = field(default_factory=list)  # the numbers, one line each


class Run:
    """One run's results, as run_cuda.sh leaves them: a stage's CSV as `<stage>.csv` (COPY_DIR) or
    `<stage>/*.csv` (OUT_DIR), its JSON as `<stage>.json`, its printed checks as `<stage>.log` (or,
    from runs before those, in the whole run's log)."""

    def __init__(self, folder: Path, log: Optional[Path] = None):
        self.folder = folder
        if not folder.is_dir():
            raise SystemExit(f'{folder}: not a folder of run_cuda.sh results')
        self.log = log if log is not None else folder / 'run.log'

    def table(self, stage):
        """{(model, mode): result} of a benchmark stage (errors kept as {'error': ...}), or None."""
        paths = [self.folder / f'{stage}.csv'] + sorted((self.folder / stage).glob('*.csv'))
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            return None
        results, _ = read_results(path)
        return {(cfg['model'], cfg['mode']): res for cfg, res in results}

    def rows(self, stage):
        path = self.folder / f'{stage}.json'
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())['rows']
        except (ValueError, KeyError) as e:  # a stage killed while writing leaves a broken file
            raise SystemExit(f'{path}: not a results file of {stage} ({type(e).__name__}: {e})')

    def checks(self, stage):
        """The PASS/FAIL lines a cuda_checks.py stage printed: its own `<stage>.log`, or its section
        of the whole run's log; None if neither holds it."""
        own = self.folder / f'{stage}.log'
        if own.is_file():
            text = own.read_text(errors='replace')
        elif self.log.is_file():
            section = re.search(rf'^=== {stage} \(limit.*?$(.*?)(^=== |\Z)', self.log.read_text(errors='replace'),
                                re.S | re.M)
            if section is None:
                return None
            text = section.group(1)
        else:
            return None
        return [line for line in text.splitlines() if line.startswith(('PASS ', 'FAIL '))]


def img_s(table, model, mode) -> Optional[float]:
    res = (table or {}).get((model, mode))
    return res.get('img_s') if res else None


def triton_row(table, model, mode) -> Optional[float]:
    """img/s of a model with the Triton kernels: 'auto' in a run that has them on, or '@triton_spc'
    (the dry run's name for the same plans)."""
    value = img_s(table, model, mode)
    return value if value is not None else img_s(table, model + '@triton_spc', mode)


def ratio(table, model, mode) -> Optional[float]:
    a, ref = img_s(table, model, mode), img_s(table, REFERENCE, mode)
    return a / ref if a is not None and ref else None


def finite(x) -> Optional[float]:
    """A measured number, or None: a NaN or infinite time is no measurement and decides nothing."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt(x, spec='.2f'):
    return 'not measured' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def fmt_s(x):
    return 'not measured' if x is None else f'{x:.0f} img/s'


def fmt_x(x):
    """A ratio to resnet50."""
    return 'not measured' if x is None else f'{x:.2f}x'


def fastest(candidates: Dict[str, Optional[float]]):
    """(name, value) of the largest measured value, or (None, None)."""
    measured = {k: v for k, v in candidates.items() if v is not None}
    return max(measured.items(), key=lambda kv: kv[1]) if measured else (None, None)


def targets(run: Run, previous=None) -> Decision:
    """The issue's targets: Small's throughput and memory against resnet50 and the peers beside it,
    and whether the other variants are faster than in the previous run (as ratios to resnet50:
    runs on different machines differ in resnet50 too)."""
    table = run.table('amp_fp16_b128')
    if table is None:
        return Decision('targets (amp_fp16_b128)', 'not measured: no amp_fp16_b128 results')
    lines, met = [], []
    smalls = [m for m, _ in table if m.split('@')[0] == SMALL and m != SMALL + '@official']
    for mode, target in TARGETS.items():
        name, best = fastest({m: ratio(table, m, mode) for m in smalls})
        peers = {p: ratio(table, p, mode) for p in PEERS_TO_BEAT}
        met.append(best is not None and best >= target and all(p is not None and best > p for p in peers.values()))
        lines.append(f'{mode}: epsanet50_small {fmt_x(best)} resnet50 ({name or "no row"}; target {target}x), '
                     + ', '.join(f'{p} {fmt_x(r)}' for p, r in peers.items()))
    # the memory of the form that trains fastest: the one a target met in speed would ship
    train_form, _ = fastest({m: img_s(table, m, 'train') for m in smalls})
    ref_mem = (table.get((REFERENCE, 'train')) or {}).get('peak_mib')
    mem = (table.get((train_form, 'train')) or {}).get('peak_mib') if train_form else None
    mem = mem / ref_mem if mem and ref_mem else None
    met.append(mem is not None and mem <= MEMORY_TARGET)
    lines.append(f'training peak memory: {fmt_x(mem)} resnet50\'s ({train_form or "no row"}; target {MEMORY_TARGET}x)')
    if previous is not None:
        models = sorted({m.split('@')[0] for m, _ in table if m.startswith('epsanet') and '@official' not in m})
        for model in models:
            for mode in TARGETS:
                now = fastest({m: ratio(table, m, mode) for m, md in table if md == mode and m.split('@')[0] == model})
                before = fastest({m: ratio(previous, m, mode) for m, md in previous
                                  if md == mode and m.split('@')[0] == model})
                lines.append(f'{model} {mode}: best {fmt_x(now[1])} ({now[0]}) against {fmt_x(before[1])} '
                             f'({before[0] or "no row"}) in the previous run')
    verdict = 'all targets met' if all(met) else 'targets not met: ' + ', '.join(
        n for n, ok in zip(['inference', 'training', 'memory'], met) if not ok)
    return Decision('targets (amp_fp16_b128)', verdict, lines)


def cudnn_rule(run: Run) -> Decision:
    """Today's per-branch cuDNN rule (@cudnn) against the dense form and the grouped conv throughout."""
    table = run.table('amp_fp16_b128')
    choice = "cuDNN rule (_branch_plans.cuda_branch_form): @cudnn against @dense, @grouped"
    lines, verdicts = [], []
    for mode in TARGETS:
        forms = {f: img_s(table, SMALL + '@' + f, mode) for f in ('cudnn', 'dense', 'grouped')}
        lines.append(f'{mode}: ' + ', '.join(f'@{f} {fmt_s(v)}' for f, v in forms.items()))
        if forms['cudnn'] is None or all(v is None for f, v in forms.items() if f != 'cudnn'):
            verdicts.append(f'{mode}: not measured')
            continue
        best, value = fastest({f: v for f, v in forms.items() if f != 'cudnn'})
        if forms['cudnn'] >= value * (1 - NOISE):
            verdicts.append(f'{mode}: keep the rule' + (' (within noise of @' + best + ')' if forms['cudnn'] < value else ''))
        else:
            verdicts.append(f'{mode}: @{best} throughout ({value / forms["cudnn"]:.2f}x the rule)')
    return Decision(choice, '; '.join(verdicts), lines)


def _psa_ms(row, form, mode):
    return finite(row.get(f'{form}/channels_last_{mode}_ms'))


def stride2(run: Run) -> Decision:
    """The rule's strided case (today: dense at inference where the branch is narrow, grouped in
    training), from the whole strided PSAs of stages 2-4, each in one form."""
    rows = run.rows('psa')
    choice = 'stride 2 (cuda_branch_form, stride > 1): dense against grouped per strided PSA'
    strided = [r for r in rows or [] if r.get('stride') == 2 and r.get('variant') == 'small']
    if not strided:
        return Decision(choice, 'not measured: no strided rows in psa.json')
    lines, wins = [], {}
    for mode in TARGETS:
        for r in strided:
            g, d = _psa_ms(r, 'grouped', mode), _psa_ms(r, 'dense', mode)
            if g is None or d is None:
                continue
            form = 'dense' if d < g * (1 - NOISE) else 'grouped' if g < d * (1 - NOISE) else 'either'
            wins.setdefault(mode, []).append((r['stage'], form))
            lines.append(f'{mode} stage {r["stage"]}: grouped {g:.2f} ms, dense {d:.2f} ms: {form}')
    verdict = '; '.join(f'{mode}: ' + ', '.join(f'stage {s} {f}' for s, f in w) for mode, w in wins.items())
    return Decision(choice, verdict or 'not measured: no strided PSA timed in both forms', lines)


def triton_default(run: Run) -> Decision:
    """The fused Triton kernels against cuDNN in the whole model, then per PSA."""
    table = run.table('amp_fp16_b128')
    choice = 'TIMM_EPSANET_TRITON on by default (epsanet50_small against @cudnn), else per PSA'
    lines, faster, measured = [], [], True
    for mode in TARGETS:
        t, c = triton_row(table, SMALL, mode), img_s(table, CUDNN, mode)
        lines.append(f'{mode}: Triton {fmt_s(t)}, @cudnn {fmt_s(c)}')
        measured = measured and t is not None and c is not None
        faster.append(measured and t > c * (1 + NOISE))
    if all(faster):
        return Decision(choice, 'on by default: the fused kernels are faster whole in both modes', lines)
    rows = [r for r in run.rows('psa') or [] if r.get('variant') == 'small']
    if not measured and not rows:
        return Decision(choice, 'not measured: neither the whole-model rows nor psa.json', lines)
    per_psa = []
    for r in rows:
        for mode in TARGETS:
            spc = _psa_ms(r, 'triton_spc', mode)
            cudnn = [v for v in (_psa_ms(r, 'grouped', mode), _psa_ms(r, 'dense', mode)) if v is not None]
            if spc is not None and cudnn and spc < min(cudnn) * (1 - NOISE):
                per_psa.append(f'stage {r["stage"]} stride {r.get("stride", 1)} {mode} '
                               f'({spc:.2f} against {min(cudnn):.2f} ms)')
    verdict = ('stays opt-in; ' if measured else 'the whole model not measured; ') + (
        'fuse only the PSAs where the kernels win: ' + ', '.join(per_psa) if per_psa
        else 'no PSA where the kernels beat cuDNN')
    return Decision(choice, verdict, lines)


def triton_attention(run: Run) -> Decision:
    """The attention's two Triton kernels with the branches on cuDNN (@cudnn+attention, as
    TIMM_EPSANET_TRITON=attention) against its dozen plain ops (@cudnn), whole model, per mode."""
    table = run.table('amp_fp16_b128')
    choice = "attention's Triton kernels, the branches on cuDNN: @cudnn+attention against @cudnn"
    lines, faster = [], {}
    for mode in TARGETS:
        a, c = img_s(table, CUDNN + '+attention', mode), img_s(table, CUDNN, mode)
        lines.append(f'{mode}: @cudnn+attention {fmt_s(a)}, @cudnn {fmt_s(c)}')
        if a is not None and c is not None:
            faster[mode] = a / c
    per_mode = '; '.join(f'{mode}: {x:.2f}x' for mode, x in faster.items())
    if len(faster) < len(TARGETS):
        return Decision(choice, 'not measured' + (f' in both modes ({per_mode})' if faster else ''), lines)
    if all(x > 1 + NOISE for x in faster.values()):
        verdict = ('on by default on CUDA: triton_attention_in_auto() true without TIMM_EPSANET_TRITON '
                   '(its first use compiles the kernels)')
    else:
        verdict = 'stays opt-in (TIMM_EPSANET_TRITON=attention)'
    return Decision(choice, f'{verdict}: {per_mode}', lines)


def large(run: Run) -> Decision:
    """Large's default (its 32 groups of 1-2 outputs on cuDNN's grouped conv) against the kernels."""
    table = run.table('amp_fp16_b128')
    choice = "Large's rule: epsanet50_large@cudnn against epsanet50_large (Triton)"
    lines, verdicts = [], []
    for mode in TARGETS:
        ref = img_s(table, REFERENCE, mode)
        c, t = ratio(table, LARGE_CUDNN, mode), triton_row(table, LARGE, mode)
        t = t / ref if t is not None and ref else None
        lines.append(f'{mode}: @cudnn {fmt_x(c)} resnet50, Triton {fmt_x(t)}')
        if c is None or t is None:
            verdicts.append(f'{mode}: not measured')
        elif t > c * 1.1:
            verdicts.append(f'{mode}: cuDNN {t / c:.2f}x behind: a rule of its own for 32-group branches '
                            '(dense or regrouped), or the kernels by default for Large')
        else:
            verdicts.append(f'{mode}: keep cuDNN')
    return Decision(choice, '; '.join(verdicts), lines)


def profile(run: Run) -> Decision:
    """Host against GPU per step, and the lines that wait for the GPU."""
    rows = run.rows('profile')
    choice = 'profile: host_ms against busy_ms, syncs'
    if not rows:
        return Decision(choice, 'not measured: no profile.json')
    lines, verdicts = [], []
    for r in rows:
        host, busy, wall = (finite(r.get(k)) for k in ('host_ms', 'busy_ms', 'wall_ms'))
        syncs = {k: v for k, v in (r.get('syncs') or {}).items() if isinstance(v, int)}
        graph = r.get('graph_ms')
        lines.append(f'{r["model"]} {r["mode"]}: wall {fmt(wall)} ms, host {fmt(host)} ms, busy {fmt(busy)} ms'
                     + (f', CUDA graph {fmt(graph)} ms' if isinstance(graph, float) else '')
                     + (f', waits at {", ".join(syncs)}' if syncs else ''))
        if r['model'] == REFERENCE:
            continue
        name = f'{r["model"]} {r["mode"]}'
        if syncs:
            verdicts.append(f'{name}: remove the waits first ({", ".join(syncs)})')
        elif host is None or busy is None:
            verdicts.append(f'{name}: not measured')
        elif host > busy:
            verdicts.append(f'{name}: host-bound ({host / busy:.2f}x busy): cut host work (host_work.py counts it)')
        else:
            verdicts.append(f'{name}: the kernels ({busy / host:.2f}x host)')
    return Decision(choice, '; '.join(verdicts) or 'only resnet50 profiled', lines)


def tiles_spc(run: Run) -> Decision:
    """A candidate tile of the fused kernels that beats the default at every stage-1 PSA, per kind."""
    rows = run.rows('tiles_spc')
    choice = "tiles_spc: the fused kernels' default tile against its candidates (mma_config_for)"
    if not rows:
        return Decision(choice, 'not measured: no tiles_spc.json')
    lines, verdicts = [], []
    for kind in dict.fromkeys(r['kernel_kind'] for r in rows):
        shapes = {}
        for r in rows:
            if r['kernel_kind'] == kind:
                shapes.setdefault((r['chs'], r['size'], str(r['groups']), r['kernel']), []).append(r)
        wins, default = None, None  # the candidates faster than the default at every shape, with their least gain
        for shape, timed in shapes.items():
            base = next((t for t in timed if t['default'] and finite(t['ms'])), None)
            if base is None:
                wins = {}  # the default not timed at a shape: no candidate can be shown better everywhere
                continue
            default = tuple(base['tile'])
            here = {tuple(t['tile']): t['x_default'] for t in timed if not t['default'] and t['error'] is None
                    and t['equal'] and finite(t['x_default']) is not None and t['x_default'] > 1 + NOISE}
            wins = here if wins is None else {k: min(v, here[k]) for k, v in wins.items() if k in here}
            for t in timed:
                result = (f'{t["x_default"]:.2f}x the default' + ('' if t['equal'] else ', NOT EQUAL')
                          if t['error'] is None and t['x_default'] is not None else f'failed: {t["error"]}')
                lines.append(f'{kind} {shape[3]} ({shape[0]} chs, {shape[1]} px): '
                             f'{"default " + describe_tile(t["tile"]) if t["default"] else changes(default, t["tile"])}: {result}')
        if wins:
            tile, gain = max(wins.items(), key=lambda kv: kv[1])
            verdicts.append(f'{kind}: make {changes(default, tile)} the default (at least {gain:.2f}x at every PSA)')
        else:
            verdicts.append(f'{kind}: keep the default')
    return Decision(choice, '; '.join(verdicts), lines)


def describe_tile(tile) -> str:
    return '(' + ', '.join(f'{k}={v}' for k, v in zip(TILE_FIELDS, tile)) + ')'


def changes(default, tile) -> str:
    """A candidate tile as its differences from the default's."""
    diff = [f'{k}={v}' for k, d, v in zip(TILE_FIELDS, default or (), tile) if d != v]
    return ', '.join(diff) if default is not None else describe_tile(tile)


def compile_stage(run: Run) -> Decision:
    """torch.compile with the Triton kernels against eager: graph breaks, equality, throughput."""
    choice = 'compile: compiled against eager'
    lines = run.checks('compile')
    if not lines:
        return Decision(choice, 'not measured: no compile section in run.log')
    speeds = {}
    for line in lines:
        m = re.match(r'PASS (eager|compiled) inference, batch \d+: ([\d.]+) img/s', line)
        if m:
            speeds[m.group(1)] = float(m.group(2))
    failed = [line for line in lines if line.startswith('FAIL')]
    if failed:
        verdict = 'fix first: ' + '; '.join(failed)
    elif len(speeds) < 2:
        verdict = 'not measured: the timing did not finish'
    elif speeds['compiled'] < speeds['eager'] * (1 - NOISE):
        verdict = (f'compiled slower ({speeds["compiled"] / speeds["eager"]:.2f}x eager): the custom ops\' '
                   'dispatch; torch.library.triton_op lets inductor launch the kernels itself')
    else:
        verdict = f'compiled at {speeds["compiled"] / speeds["eager"]:.2f}x eager: nothing to change'
    return Decision(choice, verdict, lines)


def tuning(run: Run) -> Decision:
    """Branch tuning's first use without the Triton kernels: its cost and the forms it keeps."""
    rows = run.rows('tuning')
    choice = 'tuning: first-use cost and the plans kept (cuDNN forms)'
    if not rows:
        return Decision(choice, 'not measured: no tuning.json')
    lines, slow, unmeasured, gains, kept = [], [], [], [], set()
    for r in rows:
        kept |= set(r.get('forms') or {})
        cost, speedup = finite(r.get('first_use_cost_s')), finite(r.get('speedup_median'))
        if speedup is not None and speedup > 1 + NOISE:
            gains.append(r['mode'])
        lines.append(f'{r["mode"]}: first use {fmt(cost, ".1f")} s, x{fmt(speedup, ".3f")} (median), '
                     f'forms kept {r.get("forms")}')
        if cost is None:
            unmeasured.append(r['mode'])
        elif cost > FIRST_USE_LIMIT_S:
            slow.append(r['mode'])
    if unmeasured:
        verdict = f'not measured: no first-use cost ({", ".join(unmeasured)})'
    elif slow:
        verdict = (f'first use over {FIRST_USE_LIMIT_S:.0f} s ({", ".join(slow)}): drop from the CUDA candidates '
                   f'the forms it never keeps (it kept {", ".join(sorted(kept))}); stays opt-in')
    elif gains:
        verdict = (f'first use within seconds, faster in {", ".join(gains)}: tuning on CUDA follows '
                   f'torch.backends.cudnn.benchmark (which timm\'s scripts set)')
    else:
        verdict = 'first use within seconds, no gain beyond noise: keep the candidates; stays opt-in'
    return Decision(choice, verdict, lines)


def other_settings(run: Run) -> Decision:
    """bf16 and batch 256: reported beside the fp16 batch-128 table; no choice rests on them."""
    lines = []
    for stage, modes in (('amp_bf16_b128', TARGETS), ('amp_fp16_b256', ['infer'])):
        table = run.table(stage)
        for mode in modes:
            models = sorted({m for m, md in table or {} if md == mode and m != REFERENCE})
            lines.append(f'{stage} {mode}: ' + (', '.join(f'{m} {fmt_x(ratio(table, m, mode))}' for m in models)
                                                 or 'not measured'))
    return Decision('amp_bf16_b128, amp_fp16_b256', 'for the README beside the fp16 table', lines)


DECISIONS = (targets, cudnn_rule, stride2, triton_default, triton_attention, large, profile, tiles_spc, compile_stage,
             tuning, other_settings)


def decide(run: Run, previous=None) -> List[Decision]:
    return [d(run, previous) if d is targets else d(run) for d in DECISIONS]


def markdown(decisions: List[Decision]) -> str:
    out = []
    for d in decisions:
        out += [f'### {d.choice}', '', f'**{d.verdict}**', ''] + [f'- {line}' for line in d.evidence] + ['']
    return '\n'.join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder', type=Path, help="run_cuda.sh's results (COPY_DIR or OUT_DIR)")
    parser.add_argument('--log', type=Path, default=None,
                        help="the run's printed output, where a stage's own log is missing (default: FOLDER/run.log)")
    parser.add_argument('--previous', type=Path, default=None,
                        help="an earlier run's merged results CSV, for 'faster than before'")
    parser.add_argument('--out', type=Path, default=None, help='also write the decisions here (Markdown)')
    args = parser.parse_args(argv)
    previous = None
    if args.previous is not None:
        if not args.previous.is_file():
            raise SystemExit(f'{args.previous}: no such results file')
        results, _ = read_results(args.previous)
        # the same setting as the run's amp_fp16_b128 stage: a merged file holds bf16 and batch 256 too
        previous = {(cfg['model'], cfg['mode']): res for cfg, res in results
                    if cfg['precision'] == 'amp' and cfg['batch_size'] == 128 and cfg['layout'] == 'channels_last'}
    text = markdown(decide(Run(args.folder, args.log), previous))
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == '__main__':
    main()
