"""The benchmark scripts: fair baselines, results that say where they were measured, merges that never mix machines."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import benchmark
from timm_epsanet import _branch_plans
from timm_epsanet._branch_tuning import cpu_model
from timm_epsanet import PyramidSqueezeAttention
from timm_epsanet._branch_tuning import device_name
from timm_epsanet._official import OfficialPSA

BENCHMARKS = Path(benchmark.__file__).parent
ROW = dict(model='resnet50', mode='infer', layout='nchw', precision='fp32', compile=False, device='cpu',
           batch_size=8, img_size=224, iters=6, warmup=2, threads=None)


def run_script(name, *args):
    """A benchmark script as a user runs it: `python benchmarks/<name>.py ...` (one thread: tiny
    shapes, and no OpenMP threads spinning against the other tests' on a loaded machine)."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], check=True, capture_output=True, text=True,
                          env=env).stdout


def write_run(path, machine, rows, repeats=1, date='2026-01-01'):
    benchmark.write_report([(dict(ROW, model=m), dict(img_s=v, peak_mib=1.0, faults=5.0)) for m, v in rows],
                           machine, repeats, path, date, with_plot=False)
    return path


def test_model_forms():
    official = benchmark.create('epsanet50_small@official')
    assert sum(isinstance(m, OfficialPSA) for m in official.modules()) == 16
    assert not any(isinstance(m, PyramidSqueezeAttention) for m in official.modules())
    dense = benchmark.create('epsanet50_small@dense')
    assert {c.form for c in dense.layer1[0].conv2.convs} == {'grouped', 'dense'}  # branch 0 has one group
    regrouped = benchmark.create('epsanet50_small@regrouped')
    assert {c.form for c in regrouped.layer1[0].conv2.convs} == {'grouped', 'regrouped'}
    with pytest.raises(ValueError, match='unknown model form @fast'):
        benchmark.create('epsanet50_small@fast')


def test_cudnn_form_runs_auto_without_the_triton_kernels(monkeypatch):
    """'@cudnn' in a run with TIMM_EPSANET_TRITON=1 (run_cuda.sh's): while that model runs, 'auto'
    on CUDA picks the cuDNN forms; the models before and after it keep the kernels (CUDA runs
    every model of a stage in one process)."""
    monkeypatch.setattr(_branch_plans, 'TRITON_INSTALLED', True)
    monkeypatch.setattr(_branch_plans, 'triton_too_old', lambda: False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(_branch_plans, 'TRITON_IN_AUTO', True)
    model = benchmark.create('epsanet50_small@cudnn')
    branch = model.layer1[0].conv2.convs[1]
    assert branch.form == 'auto' and branch.plan_for('cuda', True)[0] == 'triton_spc'
    with benchmark.plans_of('epsanet50_small@cudnn'):
        assert branch.plan_for('cuda', True)[0] == 'dense'
    with benchmark.plans_of('epsanet50_small'):
        assert branch.plan_for('cuda', True)[0] == 'triton_spc'
    assert _branch_plans.TRITON_IN_AUTO


@pytest.mark.parametrize('run_has_triton', [True, False])
def test_cudnn_attention_form_runs_the_attention_kernels_alone(monkeypatch, run_has_triton):
    """'@cudnn+attention': the branches on cuDNN as '@cudnn', the attention on its Triton kernels
    (TIMM_EPSANET_TRITON=attention); '@cudnn' neither. In a run without the kernels switched on,
    no suffix switches them on."""
    monkeypatch.setattr(_branch_plans, 'TRITON_INSTALLED', True)
    monkeypatch.setattr(_branch_plans, 'triton_too_old', lambda: False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(_branch_plans, 'TRITON_IN_AUTO', run_has_triton)
    monkeypatch.setattr(_branch_plans, 'TRITON_ATTENTION_IN_AUTO', False)
    branch = benchmark.create('epsanet50_small@cudnn+attention').layer1[0].conv2.convs[1]
    seen = {}
    for name in ('epsanet50_small@cudnn+attention', 'epsanet50_small@cudnn', 'epsanet50_small'):
        with benchmark.plans_of(name):
            seen[name] = branch.plan_for('cuda', True)[0], _branch_plans.triton_attention_in_auto()
    assert seen == {'epsanet50_small@cudnn+attention': ('dense', run_has_triton),
                    'epsanet50_small@cudnn': ('dense', False),
                    'epsanet50_small': ('triton_spc' if run_has_triton else 'dense', run_has_triton)}
    assert (_branch_plans.TRITON_IN_AUTO, _branch_plans.TRITON_ATTENTION_IN_AUTO) == (run_has_triton, False)


def test_results_are_a_csv_with_ratios_machine_and_date(tmp_path):
    path = write_run(tmp_path / 'benchmark-cpu.csv', 'machine A', [('resnet50', 10.0), ('epsanet50_small', 9.0)])
    rows = list(csv.DictReader(path.open()))
    assert [(r['model'], float(r['img_s']), float(r['x_resnet50'])) for r in rows] == [
        ('resnet50', 10.0, 1.0), ('epsanet50_small', 9.0, 0.9)]
    assert {(r['machine'], r['date']) for r in rows} == {('machine A', '2026-01-01')}
    results, run = benchmark.read_results(path)
    assert results[1] == (dict(ROW, model='epsanet50_small'), dict(img_s=9.0, peak_mib=1.0, faults=5.0, samples=[9.0]))


def test_merge_keeps_the_fastest_and_refuses_other_machines(tmp_path):
    a = write_run(tmp_path / 'a.csv', 'machine A', [('resnet50', 10.0)])
    b = write_run(tmp_path / 'b.csv', 'machine B', [('resnet50', 12.0)])
    with pytest.raises(SystemExit, match='different machines'):
        benchmark.merge([a, b], tmp_path / 'ab.csv')
    assert not (tmp_path / 'ab.csv').exists()
    # the same configuration in two runs: one row, the faster measurement, the samples of both
    c = write_run(tmp_path / 'c.csv', 'machine A', [('resnet50', 12.5)], repeats=2, date='2026-01-02')
    table = benchmark.merge([a, c], tmp_path / 'ac.csv')
    assert table.count('| resnet50 |') == 1 and '| resnet50 | infer | nchw | fp32 | False | 12.5 | 1.00 |' in table
    (cfg, res), = benchmark.read_results(tmp_path / 'ac.csv')[0]
    assert res['img_s'] == 12.5 and sorted(res['samples']) == [10.0, 12.5]
    assert '2026-01-01 to 2026-01-02' in table and 'best of 1-2 repeat(s)' in table
    # a merged report merges again, keeping every repeat count
    table = benchmark.merge([tmp_path / 'ac.csv', a], tmp_path / 'again.csv')
    assert 'best of 1-2 repeat(s)' in table
    assert (tmp_path / 'again.png').stat().st_size > 0


def test_bad_names_and_files_stop_at_once_naming_them(tmp_path):
    # a typo in one of the models stops the run before minutes of measuring the others, and writes nothing
    with pytest.raises(SystemExit) as info:
        benchmark.main(['--models', 'epsanet50_smal', 'resnet50@fast', 'resnet50', '--out', str(tmp_path)])
    message = str(info.value)
    assert "timm has no model 'epsanet50_smal' (did you mean epsanet50_small" in message
    assert 'resnet50@fast: unknown model form @fast' in message
    assert not list(tmp_path.iterdir())
    # a merge of what is not this script's results names the file
    image = tmp_path / 'plot.png'
    image.write_bytes(b'\x89PNG\r\n\x1a\n')
    other = tmp_path / 'other.csv'
    other.write_text('model,img_s\nresnet50,1.0\n')
    for path, why in ((tmp_path / 'missing.csv', 'cannot be read'), (image, 'cannot be read'), (other, 'no column mode')):
        with pytest.raises(SystemExit, match=re.escape(str(path)) + '.*' + why):
            benchmark.merge([path], tmp_path / 'merged.csv')
    assert not (tmp_path / 'merged.csv').exists()


def test_merged_batch_sizes_are_each_compared_with_resnet50_at_that_batch(tmp_path):
    """A run at batch 128 merged with one at 256: each row's ratio is to resnet50 at its own batch."""
    small = write_run(tmp_path / 'b128.csv', 'machine A', [('resnet50', 10.0), ('epsanet50_small', 8.0)])
    large = tmp_path / 'b256.csv'
    benchmark.write_report([(dict(ROW, model=m, batch_size=256), dict(img_s=v, peak_mib=1.0, faults=0.0))
                            for m, v in [('resnet50', 20.0), ('epsanet50_small', 10.0)]],
                           'machine A', 1, large, '2026-01-01', with_plot=False)
    table = benchmark.merge([small, large], tmp_path / 'merged.csv')
    ratios = {(r['model'], r['batch_size']): float(r['x_resnet50']) for r in csv.DictReader((tmp_path / 'merged.csv').open())}
    assert ratios == {('resnet50', '8'): 1.0, ('epsanet50_small', '8'): 0.8,
                      ('resnet50', '256'): 1.0, ('epsanet50_small', '256'): 0.5}
    assert '| epsanet50_small | infer | nchw | fp32 | False | 256 | 10.0 | 0.50 |' in table


def test_cuda_machine_line_names_gpu_torch_cudnn_and_triton(monkeypatch):
    """A CUDA results file says which GPU, torch, cuDNN and triton measured it (read here with the
    CUDA queries faked: CI has no GPU)."""
    import importlib.metadata
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *args: 'NVIDIA H200')
    monkeypatch.setattr(torch.backends.cudnn, 'version', lambda: 91900)
    machine = benchmark.machine_description('cuda')
    assert machine.startswith(f'NVIDIA H200, torch {torch.__version__}, cuDNN 91900, ')
    try:
        assert machine.endswith(f'triton {importlib.metadata.version("triton")}')
    except importlib.metadata.PackageNotFoundError:
        assert machine.endswith('no triton')


def test_machine_line_names_the_cpu_model():
    """The CPU model in benchmark machine lines is the one branch tuning keys its plan cache by,
    with its family and model numbers (VMs report generic names for different generations)."""
    from timm_epsanet._branch_tuning import device_name
    machine = benchmark.machine_description('cpu')
    assert machine.startswith(cpu_model())
    assert device_name(torch.device('cpu')).startswith(cpu_model())
    cpuinfo = Path('/proc/cpuinfo').read_text().splitlines() if Path('/proc/cpuinfo').exists() else []
    fields = dict((key.strip(), value.strip()) for key, value in
                  reversed([line.split(':', 1) for line in cpuinfo if ':' in line]))  # the first processor's
    if 'model name' in fields:
        assert machine.startswith(fields['model name'])
    if 'cpu family' in fields and 'model' in fields:
        assert f"(family {fields['cpu family']}, model {fields['model']})" in machine


@pytest.mark.slow
def test_psa_branches_times_every_form_in_every_layout(tmp_path):
    """The evidence behind cpu_branch_plan: one row per EPSANet branch shape, a time per form and
    layout (no depthwise NCHW, no volumetric channels-last, none for the dense 3x3 branch, none for
    regrouped where it merges no groups (8+ outputs each) or all (the dense conv))."""
    out = tmp_path / 'branches.json'
    run_script('psa_branches.py', '--batch-size', '1', '--iters', '1', '--variants', 'small',
               '--forms', 'grouped', 'depthwise', 'volumetric', 'regrouped', '--json', str(out))
    result = json.loads(out.read_text())
    assert result['machine'].startswith(cpu_model())
    rows = result['rows']
    assert [(r['stage'], r['kernel']) for r in rows] == [(s, k) for s in (1, 2, 3, 4) for k in (3, 5, 7, 9)]
    forms = ('grouped/nchw', 'grouped/channels_last', 'depthwise/channels_last', 'volumetric/nchw',
             'regrouped/nchw', 'regrouped/channels_last')
    for row in rows:
        times = {key: v for key, v in row.items() if key.endswith('_ms')}
        assert set(times) == {f'{f}_{m}_ms' for f in forms for m in ('infer', 'train')}
        dense_branch = row['groups'] == 1
        outs = row['chs'] // 4 // row['groups']  # outputs per group
        merges = row['groups'] > 1 and outs < 8
        for key, t in times.items():
            untimed = (dense_branch and not key.startswith('grouped')) or (key.startswith('regrouped') and not merges)
            assert math.isnan(t) if untimed else t > 0, (row, key)
    assert sum(not math.isnan(row['regrouped/nchw_infer_ms']) for row in rows) == 6


@pytest.mark.skipif(_branch_plans.triton_too_old(), reason=_branch_plans.triton_too_old_message())
def test_triton_tiles_times_each_kernel_on_neighbouring_tiles(tmp_path):
    """The tile sweep run_cuda.sh runs on a GPU, here under the Triton interpreter on one tiny PSA
    and branch: each fused kernel of the PSA's fused branches first, then each kernel of both
    branch families (tensor cores on the merged groups first), each on its default tile first,
    then its neighbours, each checked against the default."""
    out = tmp_path / 'tiles.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', TRITON_INTERPRET='1')
    subprocess.run([sys.executable, str(BENCHMARKS / 'triton_tiles.py'), '--device', 'cpu', '--dtype', 'float32',
                    '--batch-size', '1', '--stages', '1', '--size', '4', '--max-shapes', '1', '--max-tiles', '2',
                    '--iters', '1', '--warmup', '0', '--json', str(out)], check=True, capture_output=True, text=True,
                   env=env)
    rows = json.loads(out.read_text())['rows']
    assert [(r['kernels'], r['kernel_kind'], r['default']) for r in rows] == [
        (kernels, kind, default) for kernels in ('spc', 'mma', 'cuda_cores')
        for kind in ('forward', 'grad_input', 'grad_weight') for default in (True, False)]
    # Small's stage-1 PSA, its four branches fused into one group; then its largest grouped branch
    assert {(r['stage'], r['kernel'], r['groups']) for r in rows if r['kernels'] == 'spc'} == {(1, '3+5+7+9', 1)}
    assert {(r['stage'], r['kernel'], r['groups']) for r in rows if r['kernels'] != 'spc'} == {(1, 5, 4)}
    assert {r['merge'] for r in rows if r['kernels'] == 'mma'} == {4}  # 4 outputs per group, merged to 16
    assert all(r['equal'] and r['ms'] > 0 for r in rows), rows
    assert rows[1]['tile'] != rows[0]['tile']


def test_triton_tiles_goes_on_past_a_tile_the_gpu_cannot_launch():
    """A neighbouring tile that needs more shared memory than a block may have (on Hopper: the
    tensor-core weight gradient of 256 pixels and 4 taps) fails at launch: its row records the
    error and the sweep times the next tile; a default that cannot launch ends that kernel's rows."""
    pytest.importorskip('triton')
    from argparse import Namespace
    from triton.runtime.errors import OutOfResources
    from timm_epsanet._triton_branch import mma_config_for
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import triton_tiles
    finally:
        sys.path.remove(str(BENCHMARKS))
    default = mma_config_for(64, 16, 7)
    too_big = default._replace(block_p=default.block_p * 2)

    def run(tile, broken=too_big):
        if tile == broken:
            raise OutOfResources(417792, 232448, 'shared memory')
        return torch.ones(4)

    args = Namespace(max_tiles=None, batch_size=1, dtype='float16', iters=1, warmup=0)
    rows = triton_tiles.timed_tiles(run, default, 'grad_weight', True, args, torch.device('cpu'), {})
    tiles = triton_tiles.neighbour_tiles(default, 'grad_weight', True)
    assert [r['tile'] for r in rows] == [list(t) for t in tiles] and too_big in tiles
    for r in rows:
        broken = r['tile'] == list(too_big)
        assert (r['error'] is not None and 'shared memory' in r['error']) == broken, r
        assert (r['ms'] is None) == broken and (r['equal'] is None) == broken, r
    rows = triton_tiles.timed_tiles(lambda t: run(t, default), default, 'grad_weight', True, args, torch.device('cpu'), {})
    assert len(rows) == 1 and rows[0]['default'] and 'shared memory' in rows[0]['error']


@pytest.mark.skipif(_branch_plans.triton_too_old(), reason=_branch_plans.triton_too_old_message())
def test_triton_warmup_covers_every_grouped_branch_of_the_models():
    """triton_warmup.py's launches cover every grouped PSA branch conv (in, out, kernel, groups,
    stride) of all four variants, for the tensor-core form in AMP fp16 channels-last, and every PSA
    with its branches fused, the default of run_cuda.sh's model rows; and the script runs (under
    the interpreter, a tiny fused PSA and a branch)."""
    import timm
    import timm_epsanet  # noqa: F401
    from timm_epsanet._branch_conv import BranchConv2d
    from timm_epsanet._branch_tuning import reformulable
    from timm_epsanet.psa import PyramidSqueezeAttention
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import triton_warmup
    finally:
        sys.path.remove(str(BENCHMARKS))
    warmed = {(chs, chs // 4, k, groups, stride) for chs, k, groups, stride, _, form, dtype, layout
              in triton_warmup.launches() if (form, dtype, layout) == ('triton_mma', 'float16', 'channels_last')}
    for name in ('epsanet50_small', 'epsanet50_large', 'epsanet101_small', 'epsanet101_large'):
        model = timm.create_model(name, device='meta')
        for conv in model.modules():
            if isinstance(conv, BranchConv2d) and reformulable(conv):
                key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.groups, conv.stride[0])
                assert key in warmed, (name, key)
    # and every PSA fused ('triton_spc', the models' 'auto' with the kernels), AMP fp16 channels-last
    fused = {(chs, groups, stride) for _, chs, groups, stride, _, dtype, layout in triton_warmup.fused_launches()
             if (dtype, layout) == ('float16', 'channels_last')}
    for name in ('epsanet50_small', 'epsanet50_large', 'epsanet101_small', 'epsanet101_large'):
        for psa in timm.create_model(name, device='meta').modules():
            if isinstance(psa, PyramidSqueezeAttention):
                assert (psa.convs[0].in_channels, psa.groups, psa.convs[0].stride[0]) in fused, (name, psa)
    env = dict(os.environ, OMP_NUM_THREADS='1', TRITON_INTERPRET='1')
    out = subprocess.run([sys.executable, str(BENCHMARKS / 'triton_warmup.py'), '--device', 'cpu', '--processes', '1',
                          '--max-launches', '1', '--size', '4'], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.startswith('2 PSAs, branch convs'), out.stdout


def test_branch_macs_orders_the_forms_by_their_merges():
    """branch_macs.py as a user runs it: each form's MACs for Small's grouped branches grow with
    the groups it merges (grouped < regrouped < triton_mma < dense, dense at most 16x, Small's
    largest group count), and the whole model's budget follows the reference speed given."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, str(BENCHMARKS / 'branch_macs.py'), '--models', 'epsanet50_small',
                          '--reference-img-s', '1000'], check=True, capture_output=True, text=True, env=env).stdout
    assert 'may take 1250.0 us per image' in out  # 1 / (0.8 x 1000 img/s)
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.strip('|').split('|')] for line in out.splitlines())
            if len(cells) == 7 and cells[0] == 'epsanet50_small'}
    macs = [float(rows[form][3]) for form in ('grouped', 'regrouped', 'triton_mma', 'dense')]
    assert 0 < macs[0] < macs[1] < macs[2] < macs[3] <= 16 * macs[0], macs
    assert float(rows['dense'][5]) < float(rows['grouped'][5])  # tensor cores beat CUDA cores even at 9x the MACs


@pytest.mark.slow
def test_psa_plans_times_every_psa_shape(tmp_path):
    """The check of cpu_branch_plan inside whole PSA modules: every EPSANet Small PSA shape (strided
    first blocks included), auto's plan as the PSA runs it; the script verifies that every plan
    it times computes auto's output."""
    out = tmp_path / 'plans.json'
    run_script('psa_plans.py', '--batch-size', '1', '--rounds', '1', '--variants', 'small', '--json', str(out))
    rows = json.loads(out.read_text())['rows']
    assert [(r['stage'], r['stride']) for r in rows] == [(1, 1), (2, 2), (2, 1), (3, 2), (3, 1), (4, 2), (4, 1)]
    for row in rows:
        psa = PyramidSqueezeAttention(row['chs'], stride=row['stride'], groups=row['groups'])
        assert row['auto'] == ' '.join('/'.join(conv.plan_for('cpu', False)) for conv in psa.convs)
        assert row['auto_ms'] > 0 and row['best_neighbour_ms'] > 0


@pytest.mark.slow
def test_benchmark_run_records_page_faults_and_malloc_keep(tmp_path):
    """A small run end to end, in worker processes as a real run: each row has its page faults per
    iteration; --malloc-keep reaches the workers (glibc then keeps freed memory: fewer faults) and
    is part of the machine line, so such runs never merge with default ones. Two warm-up
    iterations: after one, the kept heap may still grow in the timed ones (up to ~3,500 faults
    against the default's, which ran as low as that once on a loaded machine)."""
    common = ['--models', 'epsanet50_small', '--modes', 'infer', '--layouts', 'nchw',
              '--batch-size', '4', '--iters', '2', '--warmup', '2', '--threads', '1', '--out', str(tmp_path)]
    benchmark.main(common)
    benchmark.main(common + ['--malloc-keep'])
    default, keep = (benchmark.read_results(tmp_path / f'{name}.csv')
                     for name in ('benchmark-cpu', 'benchmark-cpu-malloc_keep'))
    assert 'MALLOC_TRIM_THRESHOLD_' in keep[1]['machine'] and 'MALLOC' not in default[1]['machine']
    default_faults, keep_faults = (run[0][0][1]['faults'] for run in (default, keep))
    assert keep_faults < default_faults, (default_faults, keep_faults)
    with pytest.raises(SystemExit, match='different machines'):
        benchmark.merge([tmp_path / 'benchmark-cpu.csv', tmp_path / 'benchmark-cpu-malloc_keep.csv'],
                        tmp_path / 'mixed.csv')


@pytest.mark.slow
def test_branch_tuning_script_measures_first_use_and_tuned_throughput(tmp_path):
    """branch_tuning.py as the CUDA run calls it (--device, --amp, batch), on CPU with tiny shapes:
    a row per configuration with its first-use cost, both throughputs and the forms of the plans
    it measured, in the autocast dtype, on the machine named; and, while the first tuned call runs,
    how many plans it has tuned so far (a GPU stage's time limit may cut that call short)."""
    out = tmp_path / 'tuning.json'
    printed = run_script('branch_tuning.py', '--device', 'cpu', '--amp', '--batch-size', '2', '--img-size', '32',
                         '--rounds', '1', '--modes', 'infer', '--layouts', 'channels_last', '--threads', '1',
                         '--progress-every', '0.05', '--json', str(out))
    reports = [line for line in printed.splitlines() if line.startswith('infer channels_last: ') and 'plans tuned after' in line]
    counts = [int(line.split(': ')[1].split()[0]) for line in reports]
    assert reports and counts == sorted(counts), printed  # the plans so far, growing
    result = json.loads(out.read_text())
    assert result['machine']['device'] == device_name(torch.device('cpu'))  # the CPU model, as the plan cache names it
    (row,) = result['rows']
    assert (row['mode'], row['layout'], row['batch']) == ('infer', 'channels_last', 2)
    assert row['first_tuned_call_s'] > 0 and row['off_median_s'] > 0 and row['on_median_s'] > 0
    plans = result['plans']
    assert plans and all(key.startswith('infer|bfloat16|') for key in plans)
    assert sum(row['forms'].values()) == sum(len(plan) for plan in plans.values())
    assert counts[-1] <= len(plans)


def test_psa_branches_times_whole_psas_at_both_strides(tmp_path):
    """run_cuda.sh's psa stage: each PSA's branches together, Small's stride-1 PSAs first, then the
    strided first blocks of stages 2-4 (on inputs twice their output size), every form timed."""
    out = tmp_path / 'psa.json'
    run_script('psa_branches.py', '--whole-psa', '--batch-size', '1', '--iters', '1', '--variants', 'small',
               '--layouts', 'channels_last', '--forms', 'grouped', 'dense', '--strides', '1', '2', '--json', str(out))
    rows = json.loads(out.read_text())['rows']
    assert [(r['stage'], r['stride']) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2), (3, 2), (4, 2)]
    for row in rows:
        assert all(row[f'{form}/channels_last_{mode}_ms'] > 0 for form in ('grouped', 'dense')
                   for mode in ('infer', 'train')), row


def test_cuda_run_fits_in_8_minutes():
    """benchmarks/run_cuda.sh on one GPU: the limits of its default stages add up to at most 450 s
    (the first H200 run took 27 s more than its limits: the machine line and process starts), the
    Triton kernels compiled first, then the checks, the model table and the step profile."""
    script = (BENCHMARKS / 'run_cuda.sh').read_text()
    stages = [line.split()[1:3] for line in script.splitlines() if line.startswith('stage ')]
    limits = {name: int(seconds) for name, seconds in stages}
    default = next(line for line in script.splitlines() if line.startswith('DEFAULT_STAGES=')).split('"')[1].split()
    assert set(default) < set(limits)
    assert sum(limits[name] for name in default) <= 450, limits
    assert [name for name in limits if name in default][:4] == ['warm', 'checks', 'amp_fp16_b128', 'profile']


def test_cuda_model_table_times_every_variant_beside_the_peers():
    """run_cuda.sh's model table (amp_fp16_b128) times every registered EPSANet variant, and
    resnet50 and the peers the issue compares with, in the same run."""
    import timm
    import timm_epsanet  # noqa: F401
    script = (BENCHMARKS / 'run_cuda.sh').read_text()
    values = {}
    for line in script.splitlines():  # the unindented assignments: the GPU run's (the dry run's are indented)
        match = re.match(r'([A-Z0-9_]+)=(.*)$', line)
        if match:
            values.setdefault(match.group(1), match.group(2).strip('"'))
    start = script.index('\nstage amp_fp16_b128 ')
    command = script[start:script.index('\nstage ', start + 1)]
    names = re.findall(r'\$([A-Z0-9_]+)', command.split('--models')[1].split('--out')[0])
    models = {model.split('@')[0] for name in names for model in values.get(name, '').split()}
    assert set(timm.list_models('epsanet*')) <= models, models
    assert {'resnet50', 'seresnet50', 'resnext50_32x4d', 'res2net50_26w_4s', 'skresnet50'} <= models, models


def test_cuda_run_times_the_fused_kernels_candidate_tiles():
    """run_cuda.sh's tiles_spc stage (STAGES=tiles_spc) reaches, within the tiles it lets each fused
    kernel time, the candidates it exists for: every kernel's loads through L1 (unpipelined), the
    forward and input gradient also on 2D pixel tiles, the weight gradient's branches in one
    product and its taps in pairs. The warm stage compiles them first where the stage runs."""
    script = (BENCHMARKS / 'run_cuda.sh').read_text()
    start = script.index('\nstage tiles_spc ')
    command = script[start:script.index('\nstage ', start + 1)]
    sweep = next(line for line in script.splitlines() if line.startswith('TILES_SPC=')).split('"')[1]
    assert '$TILES_SPC' in command and '--kernels spc' in sweep
    assert '*" tiles_spc "*) WARM_TILES=(--tiles "$TILE_SHAPES $TILES_SPC")' in script
    assert '"${WARM_TILES[@]}"' in script[script.index('\nstage warm '):]  # compiled in warm-up
    max_tiles = int(sweep.split('--max-tiles')[1].split()[0])
    from timm_epsanet._triton_branch import mma_config_for
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import triton_tiles
    finally:
        sys.path.remove(str(BENCHMARKS))
    for kind in ('forward', 'grad_input', 'grad_weight'):
        default_tile = mma_config_for(64, 16)._replace(block_t=1)  # as measure_fused times them
        tiles = triton_tiles.neighbour_tiles(default_tile, kind, tensor_cores=True, fused=True)[:max_tiles]
        assert tiles[0] == default_tile and any(t.num_stages == 1 for t in tiles), (kind, tiles)
        assert any(t.stack_branches for t in tiles) == (kind == 'grad_weight'), (kind, tiles)
        assert any(t.pair_taps and t.num_stages == 1 for t in tiles) == (kind == 'grad_weight'), (kind, tiles)
        assert any(t.tile_w and t.num_stages == 1 for t in tiles) == (kind != 'grad_weight'), (kind, tiles)


def test_cuda_checks_cover_every_grouped_branch_and_psa():
    """The full case lists of cuda_checks.py (built on the GPU only, so no CPU dry run reaches them):
    every grouped branch of Small and Large at stride 1, 2 and dilation 2, and every PSA."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import cuda_checks
    finally:
        sys.path.remove(str(BENCHMARKS))
    convs = list(cuda_checks.conv_cases(tiny=False))
    # Small's 3 grouped branches and Large's 4, at stage 1 once, stage 2 twice (s2), stages 3-4 thrice (d2)
    assert len(convs) == (3 + 4) * (1 + 2 + 3 + 3)
    assert {(stride, dilation) for *_, stride, dilation, _ in convs} == {(1, 1), (2, 1), (1, 2)}
    assert all(groups > 1 and in_chs % groups == 0 for _, in_chs, _, _, groups, *_ in convs)
    assert len(list(cuda_checks.psa_cases(tiny=False))) == 2 * (1 + 2 + 3 + 3)


def test_step_profile_reports_wall_time_and_the_top_ops(tmp_path):
    """step_profile.py (a GPU's busy time against wall time) runs its code path on CPU: one row per
    model and mode, with a wall time, the host's time to issue the passes, and the ops that took
    longest, largest first."""
    out = tmp_path / 'profile.json'
    subprocess.run([sys.executable, str(BENCHMARKS / 'step_profile.py'), '--device', 'cpu', '--models', 'resnet50',
                    '--modes', 'infer', '--batch-size', '1', '--img-size', '32', '--iters', '1', '--top', '3',
                    '--json', str(out)], check=True, capture_output=True, cwd=BENCHMARKS)
    result = json.loads(out.read_text())
    (row,) = result['rows']
    assert (row['model'], row['mode']) == ('resnet50', 'infer') and row['wall_ms'] > 0 and row['host_ms'] > 0
    ms = [k['ms'] for k in row['kernels']]
    assert len(ms) == 3 and ms == sorted(ms, reverse=True) and ms[0] > 0
    assert 'convolution' in ' '.join(k['name'] for k in row['kernels'])


def _host_work_ops(*args):
    """{mode: the aten ops host_work.py lists} of one run with `args`, and its output."""
    run = subprocess.run([sys.executable, str(BENCHMARKS / 'host_work.py'), '--iters', '1', '--top', '100', *args],
                         check=True, capture_output=True, text=True, cwd=BENCHMARKS)
    ops, mode = {}, None
    for line in run.stdout.splitlines():
        if line.startswith(('infer', 'train')):
            mode = line.split()[0]
            ops[mode] = set()
        elif mode and line.strip().split()[-1].startswith('aten::'):
            ops[mode].add(line.split()[-1])
    return ops, run.stdout


_BUILDING = {'aten::new_zeros', 'aten::copy_', 'aten::eye', 'aten::mul', 'aten::to', 'aten::contiguous'}


@pytest.mark.skipif(_branch_plans.triton_too_old(), reason=_branch_plans.triton_too_old_message())
def test_host_work_shows_inference_builds_no_branch_weights_and_the_attention_fused():
    """host_work.py (the host's share of a GPU step: CUDA plans on CPU, the kernels no-ops) runs,
    and shows what the Triton plans do without ops around the kernels: after the first step, an
    inference step builds no weights (no zeroed tiles, masks, casts, copies or layouts), and
    neither mode runs the attention's plain ops (SEWeight, softmax and their gradients)."""
    ops, out = _host_work_ops('--scope', 'psa')
    attention = {'aten::softmax', 'aten::sigmoid', 'aten::relu_', 'aten::_softmax_backward_data',
                 'aten::sigmoid_backward', 'aten::threshold_backward'}
    assert set(ops) == {'infer', 'train'} and ops['infer'] and 'aten::mean' in ops['infer'], out
    assert not ops['infer'] & (_BUILDING | attention), out
    assert not ops['train'] & attention, out


def test_host_work_of_the_cudnn_plans_keeps_the_dense_weights_between_inference_steps():
    """With the cuDNN plans (dense branches at stages 1-3), an inference step after the first builds
    no block-diagonal weight: the count is of a model in eval mode, not of one switched into it
    before every step (which drops what inference keeps)."""
    ops, out = _host_work_ops('--scope', 'psa', '--plans', 'cudnn', '--modes', 'infer')
    # (the attention casts its fp32 softmax to x's dtype: an aten::to, a no-op in fp32)
    assert 'aten::conv2d' in ops['infer'] and not ops['infer'] & (_BUILDING - {'aten::to'}), out


@pytest.mark.skipif(_branch_plans.triton_too_old(), reason=_branch_plans.triton_too_old_message())
def test_host_work_of_whole_models_counts_fewer_ops_with_the_triton_plans():
    """host_work.py --scope model: the whole epsanet50_small steps with fewer host ops with the Triton
    plans (kept weight tiles, fused branches and attention), and with the attention's kernels alone,
    than with the cuDNN plans, and launches Triton kernels only with them."""
    counts, launches = {}, {}
    for plans in ('triton', 'cudnn', 'cudnn+attention'):
        run = subprocess.run([sys.executable, str(BENCHMARKS / 'host_work.py'), '--scope', 'model', '--plans', plans,
                              '--modes', 'infer', '--iters', '1'], check=True, capture_output=True, text=True,
                             cwd=BENCHMARKS)
        line = next(line for line in run.stdout.splitlines() if line.startswith('infer'))
        counts[plans] = int(line.split('ms per step,')[1].split()[0])
        launches[plans] = int(line.split('aten ops and')[1].split()[0])
    assert 0 < counts['triton'] < counts['cudnn'] and 0 < counts['cudnn+attention'] < counts['cudnn'], counts
    # the attention's kernels alone: one launch per PSA at inference
    assert launches['triton'] > launches['cudnn+attention'] == 16 and launches['cudnn'] == 0, launches
