"""benchmarks/cuda_decisions.py: a GPU run's results read into the README's decisions, the same way
every time, and a stage the run did not finish reported as not measured."""
import json

import pytest

from benchmarks import benchmark, cuda_decisions
from benchmarks.cuda_decisions import Run, decide

CONFIG = dict(layout='channels_last', precision='amp', compile=False, device='cuda', batch_size=128, img_size=224,
              iters=20, warmup=2, threads=None)
DEFAULT_TILE = [128, 1, 64, 16, 4, 1, 3, False, False, 0]
L1_TILE = [128, 1, 64, 16, 4, 1, 1, False, False, 8]  # loads through L1 on 2D tiles
PAIRS_TILE = [128, 1, 64, 16, 4, 1, 1, False, True, 0]  # the weight gradient's taps in pairs


def write_table(path, rows):
    """A benchmark.py results CSV: rows of (model, mode, img/s, peak MiB)."""
    results = [(dict(CONFIG, model=m, mode=mode), dict(img_s=v, peak_mib=mib, faults=0.0)) for m, mode, v, mib in rows]
    benchmark.write_report(results, 'NVIDIA H200, torch 2.11.0', 1, path, '2026-12-01', with_plot=False)


def write_rows(path, rows):
    path.write_text(json.dumps(dict(machine='NVIDIA H200', date='2026-12-01', args={}, rows=rows)))


def psa_row(stage, stride, grouped, dense, spc):
    """A whole-PSA row of psa_branches.py: (inference, training) ms per form."""
    row = dict(variant='small', stage=stage, chs=64 * 2 ** (stage - 1), size=56 // 2 ** (stage - 1),
               groups=[1, 4, 8, 16], stride=stride)
    for form, (infer, train) in (('grouped', grouped), ('dense', dense), ('triton_spc', spc)):
        row[f'{form}/channels_last_infer_ms'], row[f'{form}/channels_last_train_ms'] = infer, train
    return row


def tile_row(kind, size, tile, x_default, equal=True, error=None):
    return dict(variant='small', stage=1, chs=64, size=size, groups=1, kernel='3+5+7+9', kernel_kind=kind,
                tile=tile, default=tile == DEFAULT_TILE, ms=None if error else 1.0 / x_default,
                x_default=None if error else x_default, equal=None if error else equal, error=error)


@pytest.fixture
def run_folder(tmp_path):
    """A run as the device tool returns it (COPY_DIR: one flat folder, and run.log)."""
    write_table(tmp_path / 'amp_fp16_b128.csv', [
        ('resnet50', 'infer', 1000, 800), ('resnet50', 'train', 400, 6000),
        ('res2net50_26w_4s', 'infer', 600, 1000), ('res2net50_26w_4s', 'train', 200, 7000),
        ('skresnet50', 'infer', 500, 900), ('skresnet50', 'train', 160, 7500),
        ('epsanet50_small@cudnn', 'infer', 600, 800), ('epsanet50_small@cudnn', 'train', 260, 6300),
        ('epsanet50_small@cudnn+attention', 'infer', 660, 800), ('epsanet50_small@cudnn+attention', 'train', 262, 6300),
        ('epsanet50_small@dense', 'infer', 590, 800), ('epsanet50_small@dense', 'train', 300, 6700),
        ('epsanet50_small@grouped', 'infer', 550, 800), ('epsanet50_small@grouped', 'train', 240, 6200),
        ('epsanet50_small', 'infer', 820, 800), ('epsanet50_small', 'train', 250, 6900),
        ('epsanet50_large', 'infer', 500, 850), ('epsanet50_large', 'train', 150, 8000),
        ('epsanet50_large@cudnn', 'infer', 300, 850), ('epsanet50_large@cudnn', 'train', 145, 8000),
    ])
    write_rows(tmp_path / 'psa.json', [
        psa_row(1, 1, grouped=(2.2, 6.0), dense=(1.5, 4.4), spc=(1.2, 3.9)),
        psa_row(2, 1, grouped=(1.3, 3.5), dense=(0.8, 2.5), spc=(1.2, 4.0)),
        psa_row(2, 2, grouped=(1.0, 2.0), dense=(0.5, 3.0), spc=(1.1, 4.0)),
    ])
    write_rows(tmp_path / 'profile.json', [
        dict(model='resnet50', mode='train', wall_ms=22.0, busy_ms=21.0, host_ms=15.0, graph_ms=None, syncs={}),
        dict(model='epsanet50_small', mode='train', wall_ms=90.0, busy_ms=43.0, host_ms=85.0, graph_ms=None,
             syncs={}),
        dict(model='epsanet50_small@cudnn', mode='train', wall_ms=95.0, busy_ms=50.0, host_ms=40.0, graph_ms=None,
             syncs={'timm_epsanet/psa.py:120': 16}),
    ])
    write_rows(tmp_path / 'tiles_spc.json', [
        tile_row('forward', 56, DEFAULT_TILE, 1.0), tile_row('forward', 56, L1_TILE, 1.3),
        tile_row('forward', 28, DEFAULT_TILE, 1.0), tile_row('forward', 28, L1_TILE, 1.1),
        tile_row('grad_weight', 56, DEFAULT_TILE, 1.0), tile_row('grad_weight', 56, PAIRS_TILE, 1.5),
        tile_row('grad_weight', 28, DEFAULT_TILE, 1.0), tile_row('grad_weight', 28, PAIRS_TILE, 0.9),
    ])
    write_rows(tmp_path / 'tuning.json', [
        dict(mode='train', first_use_cost_s=31.0, speedup_median=1.04, forms={'grouped': 20, 'dense': 8}),
        dict(mode='infer', first_use_cost_s=4.0, speedup_median=1.01, forms={'dense': 28}),
    ])
    (tmp_path / 'run.log').write_text(
        '=== compile (limit 40s) 10:00:00\nCUDA, torch 2.11.0\n'
        'PASS torch.compile: 0 graph breaks, 19 Triton ops in the graph\n'
        'PASS eager inference, batch 128: 800 img/s\nPASS compiled inference, batch 128: 600 img/s\n'
        'all passed\n=== compile exit 0 10:00:30\n=== tuning (limit 25s) 10:00:30\n')
    return tmp_path


def verdicts(folder, previous=None):
    return {d.choice.split(' ')[0].split(':')[0]: d.verdict for d in decide(Run(folder), previous)}


def test_each_choice_follows_the_readme_table(run_folder):
    v = verdicts(run_folder)
    # the per-branch rule: kept at inference (within 2% of the dense form), lost to dense in training
    assert v['cuDNN'].startswith('infer: keep the rule') and 'train: @dense throughout (1.15x' in v['cuDNN']
    # the strided PSA: dense at inference, grouped in training
    assert v['stride'] == 'infer: stage 2 dense; train: stage 2 grouped'
    # faster whole only at inference: opt-in, fused only where a PSA beats cuDNN's best form
    assert v['TIMM_EPSANET_TRITON'].startswith('stays opt-in; fuse only the PSAs where the kernels win:')
    assert 'stage 1 stride 1 infer' in v['TIMM_EPSANET_TRITON'] and 'stage 1 stride 1 train' in v['TIMM_EPSANET_TRITON']
    assert 'stage 2' not in v['TIMM_EPSANET_TRITON']
    # the attention's kernels faster at inference, within noise in training: they stay opt-in
    assert v["attention's"] == 'stays opt-in (TIMM_EPSANET_TRITON=attention): infer: 1.10x; train: 1.01x'
    # Large on cuDNN far behind at inference only
    assert v["Large's"].startswith('infer: cuDNN 1.67x behind') and v["Large's"].endswith('train: keep cuDNN')
    # host-bound with the kernels; the cuDNN plans wait for the GPU, which comes first
    assert 'epsanet50_small train: host-bound (1.98x busy)' in v['profile']
    assert 'epsanet50_small@cudnn train: remove the waits first (timm_epsanet/psa.py:120)' in v['profile']
    # a tile that wins at every PSA becomes the default; one that loses at one does not
    assert 'forward: make num_stages=1, tile_w=8 the default (at least 1.10x at every PSA)' in v['tiles_spc']
    assert 'grad_weight: keep the default' in v['tiles_spc']
    assert v['compile'].startswith('compiled slower (0.75x eager)')
    assert v['tuning'].startswith('first use over 10 s (train): drop') and v['tuning'].endswith('stays opt-in')


@pytest.mark.parametrize('speedup, verdict', [
    (1.04, 'first use within seconds, faster in train: tuning on CUDA follows torch.backends.cudnn.benchmark'),
    (1.01, 'first use within seconds, no gain beyond noise: keep the candidates; stays opt-in'),
])
def test_tuning_follows_cudnn_benchmark_only_where_it_is_cheap_and_pays(run_folder, speedup, verdict):
    write_rows(run_folder / 'tuning.json', [
        dict(mode='train', first_use_cost_s=6.0, speedup_median=speedup, forms={'grouped': 20, 'dense': 8}),
        dict(mode='infer', first_use_cost_s=2.0, speedup_median=1.01, forms={'dense': 28}),
    ])
    assert verdicts(run_folder)['tuning'].startswith(verdict)


def test_the_attention_kernels_go_on_by_default_only_where_faster_in_both_modes(run_folder):
    table = Run(run_folder).table('amp_fp16_b128')
    rows = [(m, mode, r['img_s'], r['peak_mib']) for (m, mode), r in table.items()]
    faster = [(m, mode, v * 1.1 if m.endswith('+attention') else v, mib) for m, mode, v, mib in rows]
    write_table(run_folder / 'amp_fp16_b128.csv', faster)
    assert verdicts(run_folder)["attention's"].startswith('on by default on CUDA')
    write_table(run_folder / 'amp_fp16_b128.csv', [r for r in faster if r[:2] != ('epsanet50_small@cudnn', 'train')])
    assert verdicts(run_folder)["attention's"] == 'not measured in both modes (infer: 1.21x)'


def test_targets_name_the_fastest_small_and_compare_with_the_previous_run(run_folder):
    previous = {('epsanet50_large', 'infer'): dict(img_s=470.0), ('resnet50', 'infer'): dict(img_s=1000.0)}
    decision = decide(Run(run_folder), previous)[0]
    # inference 0.82x with the kernels, training 0.75x in the dense form, both ahead of the peers; the
    # dense form, fastest in training, takes 1.12x resnet50's memory (the grouped conv less, but slower)
    assert decision.verdict == 'targets not met: memory'
    assert 'infer: epsanet50_small 0.82x resnet50 (epsanet50_small; target 0.8x), res2net50_26w_4s 0.60x, ' \
           'skresnet50 0.50x' in decision.evidence
    assert "training peak memory: 1.12x resnet50's (epsanet50_small@dense; target 1.1x)" in decision.evidence
    assert 'epsanet50_large infer: best 0.50x (epsanet50_large) against 0.47x (epsanet50_large) in the previous run' \
        in decision.evidence

def test_a_stage_the_run_did_not_finish_is_not_measured(tmp_path):
    write_table(tmp_path / 'amp_fp16_b128.csv', [('resnet50', 'infer', 1000, 800), ('resnet50', 'train', 400, 6000)])
    for d in decide(Run(tmp_path)):
        assert 'not measured' in d.verdict or d.verdict.startswith(('targets not met', 'for the README')), d


def test_a_broken_results_file_is_named(tmp_path):
    (tmp_path / 'psa.json').write_text('{"rows": [')  # a stage killed while writing
    with pytest.raises(SystemExit, match='psa.json: not a results file of psa'):
        decide(Run(tmp_path))
    with pytest.raises(SystemExit, match='not a folder of run_cuda.sh results'):
        Run(tmp_path / 'missing')


def test_the_script_reads_the_output_folder_layout_and_writes_markdown(run_folder, tmp_path_factory, capsys):
    out_dir = tmp_path_factory.mktemp('out_dir')  # OUT_DIR: a stage's CSV inside its own folder
    (out_dir / 'amp_fp16_b128').mkdir()
    (run_folder / 'amp_fp16_b128.csv').rename(out_dir / 'amp_fp16_b128' / 'benchmark-cuda-h200.csv')
    for name in ('psa.json', 'profile.json', 'tiles_spc.json', 'tuning.json'):
        (run_folder / name).rename(out_dir / name)
    # a stage's own log, as run_cuda.sh now keeps it beside the run's
    (out_dir / 'compile.log').write_text((run_folder / 'run.log').read_text().split('=== ')[1])
    report = out_dir / 'decisions.md'
    cuda_decisions.main([str(out_dir), '--out', str(report)])
    text = report.read_text()
    assert capsys.readouterr().out == text + '\n'
    assert '**infer: keep the rule; train: @dense throughout (1.15x the rule)**' in text
    assert '**compiled slower (0.75x eager)' in text


def test_a_nan_measurement_decides_nothing(run_folder):
    rows = json.loads((run_folder / 'psa.json').read_text())['rows']
    rows[2]['dense/channels_last_infer_ms'] = float('nan')  # the strided PSA's dense form at inference
    write_rows(run_folder / 'psa.json', rows)
    profile = json.loads((run_folder / 'profile.json').read_text())['rows']
    profile[1]['host_ms'] = float('nan')
    write_rows(run_folder / 'profile.json', profile)
    tuning = json.loads((run_folder / 'tuning.json').read_text())['rows']
    tuning[0]['first_use_cost_s'] = float('nan')
    write_rows(run_folder / 'tuning.json', tuning)
    v = verdicts(run_folder)
    assert v['stride'] == 'train: stage 2 grouped'  # no inference verdict from a NaN
    assert 'epsanet50_small train: not measured' in v['profile']
    assert v['tuning'] == 'not measured: no first-use cost (train)'
