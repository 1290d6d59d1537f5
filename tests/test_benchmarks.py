"""The benchmark's baselines and bookkeeping: a speed comparison is only fair if it compares the same function."""
import json
import sys
from pathlib import Path

import pytest
import torch

import timm_epsanet  # noqa: F401
from timm_epsanet import PyramidSqueezeAttention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import benchmark  # noqa: E402
from official_structure import OfficialStructurePSA  # noqa: E402


def test_official_structure_computes_psa_in_reversed_branch_order():
    psa = PyramidSqueezeAttention(64, stride=2).eval()
    official = OfficialStructurePSA(psa).eval()
    assert all(a.weight is b.weight for a, b in zip(official.convs, psa.convs))  # shared, not copied
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        ours, theirs = psa(x), official(x)
    torch.testing.assert_close(theirs, torch.cat(ours.chunk(4, dim=1)[::-1], dim=1), rtol=1e-5, atol=1e-5)


def test_model_forms():
    official = benchmark.create('epsanet50_small@official')
    assert sum(isinstance(m, OfficialStructurePSA) for m in official.modules()) == 16
    assert not any(isinstance(m, PyramidSqueezeAttention) for m in official.modules())
    dense = benchmark.create('epsanet50_small@dense')
    assert {c.form for c in dense.layer1[0].conv2.convs} == {'grouped', 'dense'}  # branch 0 has one group
    with pytest.raises(ValueError, match='unknown model form @fast'):
        benchmark.create('epsanet50_small@fast')


def test_merge_refuses_runs_from_different_machines(tmp_path):
    rows = [dict(model='resnet50', mode='infer', layout='nchw', precision='fp32', compile=False, device='cpu',
                 batch_size=8, img_size=224, iters=6, warmup=2, threads=None, img_s=10.0, peak_mib=1.0)]
    for name, machine in (('a', 'machine A'), ('b', 'machine B')):
        (tmp_path / f'{name}.json').write_text(json.dumps(dict(machine=machine, repeats=1, rows=rows)))
    with pytest.raises(SystemExit, match='different machines'):
        benchmark.merge([tmp_path / 'a.json', tmp_path / 'b.json'], tmp_path / 'out')
    table = benchmark.merge([tmp_path / 'a.json'], tmp_path / 'out')
    assert '| resnet50 | infer | nchw | fp32 | False | 10.0 | 1.00 |' in table
    # a merged report merges again (its repeats read '1-2')
    (tmp_path / 'c.json').write_text(json.dumps(dict(machine='machine A', repeats=2, rows=rows)))
    benchmark.merge([tmp_path / 'a.json', tmp_path / 'c.json'], tmp_path / 'ac')
    table = benchmark.merge([tmp_path / 'ac' / 'benchmark.json', tmp_path / 'a.json'], tmp_path / 'again')
    assert 'best of 1-2 repeat(s)' in table
    assert (tmp_path / 'out' / 'benchmark.png').stat().st_size > 0
    # the same configuration in two runs: one row, the faster measurement, the samples of both
    faster = [dict(rows[0], img_s=12.5, peak_mib=0.5, samples=[12.5, 11.0])]
    (tmp_path / 'd.json').write_text(json.dumps(dict(machine='machine A', repeats=2, rows=faster)))
    table = benchmark.merge([tmp_path / 'a.json', tmp_path / 'd.json'], tmp_path / 'ad')
    assert table.count('| resnet50 |') == 1 and '| resnet50 | infer | nchw | fp32 | False | 12.5 | 1.00 | 1 |' in table
    row, = json.loads((tmp_path / 'ad' / 'benchmark.json').read_text())['rows']
    assert sorted(row['samples']) == [10.0, 11.0, 12.5] and row['peak_mib'] == 1.0


def test_psa_branches_times_every_form_in_every_layout(tmp_path):
    """The evidence behind cpu_branch_plan: one row per EPSANet branch shape, a time per form and
    layout (no depthwise NCHW, no volumetric channels-last, none for the dense 3x3 branch), and the
    plans 'auto' picks."""
    import psa_branches
    from timm_epsanet._branch_plans import cpu_branch_plan
    out = tmp_path / 'branches.json'
    psa_branches.main(['--batch-size', '1', '--iters', '1', '--variants', 'small', '--forms', 'grouped', 'depthwise',
                       'volumetric', '--json', str(out)])
    rows = json.loads(out.read_text())['rows']
    assert [(r['stage'], r['kernel']) for r in rows] == [(s, k) for s in (1, 2, 3, 4) for k in (3, 5, 7, 9)]
    for row in rows:
        times = {key: v for key, v in row.items() if key.endswith('_ms')}
        forms = ('grouped/nchw', 'grouped/channels_last', 'depthwise/channels_last', 'volumetric/nchw')
        assert set(times) == {f'{f}_{m}_ms' for f in forms for m in ('infer', 'train')}
        dense_branch = row['groups'] == 1
        assert all((t != t) == (dense_branch and not key.startswith('grouped')) for key, t in times.items())  # nan
        if not dense_branch:
            shape = (row['kernel'], row['chs'] // row['groups'], row['chs'] // 4 // row['groups'], row['groups'])
            assert row['auto'] == ' / '.join('/'.join(cpu_branch_plan(*shape, training=t)) for t in (False, True))


def test_psa_plans_times_auto_against_every_one_branch_change(tmp_path):
    """The check of cpu_branch_plan inside whole PSA modules: every EPSANet Small PSA shape (strided
    first blocks included), auto's plan as the PSA picks it, and all 9 plans that change one of its
    3 reformulable branches, each verified to compute the same output before it is timed."""
    import psa_plans
    out = tmp_path / 'plans.json'
    psa_plans.main(['--batch-size', '1', '--rounds', '2', '--variants', 'small', '--json', str(out)])
    rows = json.loads(out.read_text())['rows']
    assert [(r['stage'], r['stride']) for r in rows] == [(1, 1), (2, 2), (2, 1), (3, 2), (3, 1), (4, 2), (4, 1)]
    for row in rows:
        psa = PyramidSqueezeAttention(row['chs'], stride=row['stride'], groups=row['groups'])
        assert row['auto'] == psa_plans.plan_name([conv.plan_for('cpu', False) for conv in psa.convs])
        assert row['neighbours'] == 9 and row['best_neighbour'] != row['auto']
        assert row['auto_ms'] > 0 and row['best_neighbour_ms'] > 0


def test_benchmark_run_records_page_faults_and_malloc_keep(tmp_path):
    """A small run end to end, in worker processes as a real run: each row has its page faults per
    iteration. By default glibc returns the memory of large freed tensors to the OS and faults it in
    again every iteration (tens of thousands of faults here); --malloc-keep must reach the workers and
    remove most of them, and is part of the machine line, so such runs never merge with default ones."""
    common = ['--models', 'epsanet50_small', '--modes', 'infer', '--layouts', 'nchw',
              '--batch-size', '4', '--iters', '2', '--warmup', '1']
    runs = {}
    for name, extra in (('default', []), ('keep', ['--malloc-keep'])):
        benchmark.main(common + extra + ['--out', str(tmp_path / name)])
        runs[name] = json.loads((tmp_path / name / 'benchmark.json').read_text())
    assert 'MALLOC_TRIM_THRESHOLD_' in runs['keep']['machine'] and 'MALLOC' not in runs['default']['machine']
    default_faults, keep_faults = (runs[name]['rows'][0]['faults'] for name in ('default', 'keep'))
    assert default_faults > 10000 and keep_faults < default_faults / 4, (default_faults, keep_faults)
    table = (tmp_path / 'keep' / 'benchmark.md').read_text()
    assert '| page faults / iter [2] |' in table and f'| {keep_faults:.0f} |' in table
    with pytest.raises(SystemExit, match='different machines'):
        benchmark.merge([tmp_path / 'keep' / 'benchmark.json', tmp_path / 'default' / 'benchmark.json'], tmp_path / 'm')
