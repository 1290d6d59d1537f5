"""Branch plans measured on first use (`set_branch_tuning`): which plan wins, what is rejected,
the on-disk cache, and that nothing else changes. Timings are faked (`measure` is replaced), so
no test depends on this machine's speed."""
import json
import threading

import pytest
import torch

import timm_epsanet
from timm_epsanet import PyramidSqueezeAttention, _branch_tuning
from timm_epsanet._branch_conv import BranchConv2d, BranchConvs

CHS = 64  # branches (k3 g1, k5 g4, k7 g8, k9 g16), 16 outputs each


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Tuning on, a fresh in-memory state, the cache in tmp_path; records the plans that PSAs of
    the 'auto' branch form run (not those of the plain grouped reference)."""
    state = _branch_tuning._State()
    state.enabled, state.cache_dir = True, tmp_path
    monkeypatch.setattr(_branch_tuning, '_state', state)
    ran, tuning_now = [], []
    run_plans, tune = BranchConvs.run_plans, _branch_tuning.tune

    def recording(self, x, plans, **kwargs):
        if any(conv.form == 'auto' for conv in self) and not tuning_now:
            ran.append([tuple(p) for p in plans])
        return run_plans(self, x, plans, **kwargs)

    def tuning(*args):
        tuning_now.append(True)
        try:
            return tune(*args)
        finally:
            tuning_now.pop()
    monkeypatch.setattr(BranchConvs, 'run_plans', recording)
    monkeypatch.setattr(_branch_tuning, 'tune', tuning)
    return ran


class TimedParts(list):
    plans: list


def fake_timer(monkeypatch, times=None, default=1.0, whole=None):
    """Replace the timer: each branch candidate or convert costs `times[key]` seconds (keys as in
    `tune`), else `default`; a whole PSA plan costs `whole[plan]`, else the sum of its parts. Returns the list of the
    parts timed, one set per tuning (`timed.plans`: the whole plans timed)."""
    timed, timed.plans = TimedParts(), []
    times = times or {}

    def measure(calls, device, warmup=False, repeats=2):
        if all(key[0] != 'plan' for key in calls):
            timed.append(set(calls))
            return {key: [times.get(key, default)] for key in calls}
        timed.plans.append(set(calls))
        convert = [key for key in timed[-1] if key[0] == 'convert'][0]  # the parts timed just before
        if whole is not None:
            return {key: whole[key[1]] for key in calls}
        return {key: [sum(times.get((i, choice), default) for i, choice in enumerate(key[1]))
                + (times.get(convert, default) if any(layout == convert[1] for _, layout in key[1]) else 0.0)]
                for key in calls}
    monkeypatch.setattr(_branch_tuning, 'measure', measure)
    return timed


def psa_pair(chs=CHS):
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(chs).eval()
    plain = PyramidSqueezeAttention(chs, branch_form='grouped').eval()
    plain.load_state_dict(psa.state_dict())
    return psa, plain


def rules(psa, training=False, caller='nchw'):
    plans = [conv.plan_for('cpu', training) for conv in psa.convs]
    flexible = 'channels_last' if any(layout == 'channels_last' for _, layout in plans) else caller
    return [(form, flexible if layout == 'any' else layout) for form, layout in plans]


def test_off_by_default_never_measures(monkeypatch):
    """Tuning off (the default): the rules' plan, nothing timed, nothing written."""
    monkeypatch.delenv(_branch_tuning.ENV_SWITCH, raising=False)
    assert _branch_tuning._State().enabled is False
    monkeypatch.setattr(_branch_tuning, '_state', _branch_tuning._State())
    monkeypatch.setattr(_branch_tuning, 'measure', lambda *a: pytest.fail('measured with tuning off'))
    psa, plain = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(psa(x), plain(x), rtol=1e-5, atol=1e-5)
    assert _branch_tuning.tuned_plans(psa.convs, x, False) is None


@pytest.mark.parametrize('value, enabled', [('1', True), ('on', True), ('TRUE', True), ('0', False), ('', False),
                                            ('off', False), (None, False)])
def test_environment_switch(value, enabled):
    assert _branch_tuning._env_flag(value) is enabled


def test_environment_switch_rejects_typos():
    with pytest.warns(UserWarning, match="TIMM_EPSANET_TUNE='yse'"):
        assert _branch_tuning._env_flag('yse') is False


def test_set_branch_tuning_switches_and_returns_the_previous_state(monkeypatch, tmp_path):
    monkeypatch.setattr(_branch_tuning, '_state', _branch_tuning._State())
    _branch_tuning._state.enabled = False
    assert timm_epsanet.set_branch_tuning(True, cache_dir=tmp_path) is False
    assert _branch_tuning._state.enabled and _branch_tuning.cache_dir() == tmp_path
    assert timm_epsanet.set_branch_tuning(False) is True
    with pytest.raises(TypeError, match=r"enabled=...\) takes True or False, got 'yes'"):
        timm_epsanet.set_branch_tuning('yes')


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.setattr(_branch_tuning, '_state', _branch_tuning._State())
    monkeypatch.delenv(_branch_tuning.ENV_CACHE_DIR, raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert _branch_tuning.cache_dir() == tmp_path / 'xdg' / 'timm_epsanet'
    monkeypatch.setenv(_branch_tuning.ENV_CACHE_DIR, str(tmp_path / 'mine'))
    assert _branch_tuning.cache_dir() == tmp_path / 'mine'


@pytest.mark.parametrize('channels_last', [False, True])
def test_fastest_plan_wins_and_is_used(tuning, monkeypatch, channels_last):
    """The plan of least measured cost runs, and computes the grouped convs' function."""
    psa, plain = psa_pair()
    caller = 'channels_last' if channels_last else 'nchw'
    x = torch.randn(2, CHS, 8, 8).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # every branch fastest as the grouped conv in the caller's layout, except branch 3: depthwise
    times = {(i, ('grouped', caller)): 0.1 for i in range(4)}
    times[(3, ('depthwise', 'channels_last'))] = 0.01
    other = 'nchw' if channels_last else 'channels_last'
    times[('convert', other)] = 0.0
    timed = fake_timer(monkeypatch, times)
    with torch.no_grad():
        y = psa(x)
    want = [('grouped', caller)] * 3 + [('depthwise', 'channels_last')]
    assert tuning == [want]
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)
        psa(x)  # measured once: the second forward reuses the plan
    assert len(timed) == 1 and tuning[-1] == want
    # every branch's candidates and the convert to the other layout were timed
    assert ('convert', other) in timed[0]
    assert {key[1] for key in timed[0] if key[0] == 3} == {
        ('grouped', 'nchw'), ('grouped', 'channels_last'), ('depthwise', 'channels_last'), ('volumetric', 'nchw')}
    assert {key[1] for key in timed[0] if key[0] == 0} == {('grouped', 'nchw'), ('grouped', 'channels_last')}


def test_the_convert_is_counted_once_per_plan(tuning, monkeypatch):
    """Branches in the other layout share one convert of the input: it decides the plan."""
    psa, _ = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    base = {(i, ('grouped', 'nchw')): 1.0 for i in range(4)}
    # channels-last saves 0.3 on each of branches 1-3 and 0.1 on branch 0
    cl = {(i, ('grouped', 'channels_last')): 0.7 for i in range(1, 4)} | {(0, ('grouped', 'channels_last')): 0.9}
    for convert, want in ((0.5, ['channels_last'] * 4), (1.5, ['nchw'] * 4)):  # once: 3.5 < 4; per branch: 5 > 4
        tuning.clear()
        _branch_tuning._state.tables.clear()
        _branch_tuning._state.persistent = False
        fake_timer(monkeypatch, base | cl | {('convert', 'channels_last'): convert}, default=5.0)
        with torch.no_grad():
            psa(x)
        assert [layout for _, layout in tuning[0]] == want


def test_rules_stay_unless_clearly_slower(tuning, monkeypatch):
    """A plan only slightly cheaper than the rules' (within measurement noise) does not replace them."""
    psa, _ = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    rule_plan = rules(psa)
    times = {(i, choice): 1.0 for i, choice in enumerate(rule_plan)}
    times[(0, ('grouped', 'channels_last' if rule_plan[0][1] == 'nchw' else 'nchw'))] = 0.99
    fake_timer(monkeypatch, times | {('convert', 'channels_last'): 0.0}, default=5.0)
    with torch.no_grad():
        psa(x)
    assert tuning == [rule_plan]


def test_a_new_plan_must_be_faster_on_the_whole_psa(tuning, monkeypatch):
    """Branches timed alone say a plan is cheaper; it replaces the rules' only if the whole PSA,
    timed under both plans, confirms it: by more than the noise margin, and every call faster."""
    psa, _ = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    rule_plan = rules(psa)
    other = ('grouped', 'nchw' if rule_plan[0][1] == 'channels_last' else 'channels_last')
    times = {(i, choice): 1.0 for i, choice in enumerate(rule_plan)} | {(0, other): 0.1, ('convert', 'channels_last'): 0.0}
    better = [other] + rule_plan[1:]
    for whole_times, want in ((([1.0], [0.99]), rule_plan), (([1.0, 1.2], [0.9, 1.01]), rule_plan),
                             (([1.0, 1.2], [0.9, 0.95]), better)):
        tuning.clear()
        _branch_tuning._state.tables.clear()
        _branch_tuning._state.persistent = False
        timed = fake_timer(monkeypatch, times, default=5.0, whole=dict(zip((tuple(rule_plan), tuple(better)), whole_times)))
        with torch.no_grad():
            psa(x)
        assert timed.plans == [{('plan', tuple(rule_plan)), ('plan', tuple(better))}]
        assert tuning == [want]


def test_no_hook_sees_the_trials(tuning, monkeypatch):
    """Tuning's trial runs are its own, as cuDNN's benchmark trials are: a hook on a branch (a FLOP
    counter, a summary) sees one call per forward, the tuning forward included."""
    psa, _ = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    rule_plan = rules(psa)
    other = ('grouped', 'nchw' if rule_plan[0][1] == 'channels_last' else 'channels_last')
    timed = fake_timer(monkeypatch, {(i, choice): 1.0 for i, choice in enumerate(rule_plan)}
                       | {(0, other): 0.1, ('convert', 'channels_last'): 0.0}, default=5.0)
    fake = _branch_tuning.measure

    def running_each_trial(calls, device, warmup=False, repeats=2):
        for call in calls.values():
            call()
        return fake(calls, device, warmup, repeats)
    monkeypatch.setattr(_branch_tuning, 'measure', running_each_trial)
    seen = []
    for conv in psa.convs:
        conv.register_forward_hook(lambda module, args, out: seen.append(module))
    with torch.no_grad():
        psa(x)
    assert timed.plans, 'the whole PSA was not timed: no trial of whole plans ran'
    assert seen == list(psa.convs)


def test_wrong_or_failing_forms_are_never_used(tuning, monkeypatch):
    """A candidate that raises, or returns a wrong or non-finite output, is dropped before timing,
    however fast it would be."""
    psa, plain = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    forward_as = type(psa.convs[0]).forward_as

    def broken(self, x, form):
        y = forward_as(self, x, form)
        if form == 'depthwise':
            return y + 1e-2 * y.abs().max()  # slightly wrong
        if form == 'volumetric' and self.groups == 16:
            return y * float('nan')
        if form == 'volumetric':
            raise RuntimeError('not on this device')
        return y
    monkeypatch.setattr(type(psa.convs[0]), 'forward_as', broken)
    # the broken forms would be fastest
    times = {(i, (f, l)): 1e-6 for i in range(4) for f, l in (('depthwise', 'channels_last'), ('volumetric', 'nchw'))}
    timed = fake_timer(monkeypatch, times, default=1.0)
    with torch.no_grad():
        y = psa(x)
    assert all(form == 'grouped' for form, _ in tuning[0])
    assert not any(key[1][0] in ('depthwise', 'volumetric') for key in timed[0] if key[0] != 'convert')
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)  # plain: grouped convs only


def test_non_finite_input_is_not_tuned_on(tuning, monkeypatch):
    """An input whose grouped conv is not finite cannot check candidates: the rules run, nothing is
    kept, and the next finite input tunes."""
    psa, _ = psa_pair()
    timed = fake_timer(monkeypatch)
    x = torch.randn(2, CHS, 8, 8)
    x[0, 0, 0, 0] = float('inf')
    with torch.no_grad():
        assert not torch.isfinite(psa(x)).all()
    assert timed == [] and tuning == [[conv.plan_for('cpu', False) for conv in psa.convs]]
    with torch.no_grad():
        psa(torch.randn(2, CHS, 8, 8))
    assert len(timed) == 1


def test_plans_differ_by_mode_layout_dtype_and_size(tuning, monkeypatch):
    psa, _ = psa_pair()
    timed = fake_timer(monkeypatch)
    x = torch.randn(2, CHS, 8, 8)
    with torch.no_grad():
        psa(x)
        psa(torch.randn(2, CHS, 7, 7))  # same size bucket (8x8): no new measurement
        psa(torch.randn(1, CHS, 8, 8))  # batch 1 and 2 are different buckets
        psa(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            psa(x)
    psa.train()
    psa(x.requires_grad_()).sum().backward()
    psa(x.detach()).sum().backward()  # behind a frozen layer: no input gradient to time
    keys = list(_branch_tuning._state.tables.values())[0]
    assert len(timed) == 6 == len(keys)
    assert sorted(key.split('|')[0] for key in keys) == ['infer'] * 4 + ['train', 'train_frozen_input']
    assert any('|bfloat16|' in key for key in keys) and any('|channels_last|' in key for key in keys)


def test_training_measures_without_touching_gradients(tuning):
    """Tuning in a training forward (real timer, tiny PSA) leaves the parameters' .grad as
    without tuning, and the plan it finds computes the same gradients."""
    psa, plain = psa_pair()
    psa.train(), plain.train()
    x = torch.randn(2, CHS, 8, 8, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    grad = torch.randn(2, CHS, 8, 8)
    (psa(x) * grad).sum().backward()
    (plain(x_plain) * grad).sum().backward()
    assert len(tuning) == 1
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(psa.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_disk_cache_serves_a_new_process_and_survives_bad_files(tuning, monkeypatch, tmp_path):
    psa, _ = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    times = {(3, ('grouped', 'channels_last')): 0.0, ('convert', 'channels_last'): 0.0}
    fake_timer(monkeypatch, times)
    with torch.no_grad():
        psa(x)
    plan = tuning[-1]
    path = _branch_tuning.cache_path(x.device)
    assert path.parent == tmp_path and [p.name for p in tmp_path.glob('*.json')] == [path.name]
    data = json.loads(path.read_text())
    assert (data['device'], data['torch'], data['timm_epsanet']) == _branch_tuning._header(x.device)
    assert [tuple(c) for c in list(data['plans'].values())[0]] == plan

    def new_process():
        _branch_tuning._state.tables.clear()
        _branch_tuning._state.warned.clear()
        return fake_timer(monkeypatch, times)

    timed = new_process()
    with torch.no_grad():
        psa(x)
    assert timed == [] and tuning[-1] == plan  # read from disk, not measured

    good = path.read_text()
    for bad in ('{"format": 1, "plans": ', json.dumps(dict(data, device='another GPU')),
                json.dumps(dict(data, plans={'k': [['fast', 'nchw']]})), '\xff\xfe'):
        path.write_text(bad)
        timed = new_process()
        with pytest.warns(RuntimeWarning, match='ignoring the plan cache|cannot read the plan cache'):
            with torch.no_grad():
                psa(x)
        assert len(timed) == 1 and tuning[-1] == plan
        assert json.loads(path.read_text()) == json.loads(good)  # rewritten whole
    assert not list(tmp_path.glob('*.tmp'))


def test_cache_merges_entries_of_other_writers(tuning, monkeypatch):
    """An entry written by another process since this one read the file is kept when this one writes."""
    fake_timer(monkeypatch)
    psa, _ = psa_pair()
    with torch.no_grad():
        psa(torch.randn(2, CHS, 8, 8))
        _branch_tuning._state.tables.clear()  # "another process", which read the file before the first wrote it
        _branch_tuning._state.tables[(str(_branch_tuning.cache_path(torch.device('cpu'))),
                                      _branch_tuning._header(torch.device('cpu')))] = {}
        psa(torch.randn(2, CHS, 16, 16))
    plans = json.loads(_branch_tuning.cache_path(torch.device('cpu')).read_text())['plans']
    assert sorted(key.split('|')[5] for key in plans) == ['16x16', '8x8']


def test_unwritable_cache_warns_and_keeps_plans_in_memory(tuning, monkeypatch, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    _branch_tuning._state.cache_dir = blocker / 'cache'  # a folder inside a file: cannot be created
    timed = fake_timer(monkeypatch)
    psa, _ = psa_pair()
    with pytest.warns(RuntimeWarning, match='cannot write the plan cache'):
        with torch.no_grad():
            psa(torch.randn(2, CHS, 8, 8))
            psa(torch.randn(2, CHS, 8, 8))
    assert len(timed) == 1


def test_threads_measure_each_plan_once(tuning, monkeypatch):
    timed = fake_timer(monkeypatch)
    psa, _ = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    errors = []

    def forward():
        try:
            with torch.no_grad():
                psa(x)
        except Exception as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)
    threads = [threading.Thread(target=forward) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(timed) == 1 and len(tuning) == 4


def test_real_timer_finds_a_correct_plan(tuning):
    """The real timer end to end (tiny shapes): whatever plan it picks computes the grouped convs'
    function, and every plan it considered was checked."""
    psa, plain = psa_pair()
    x = torch.randn(2, CHS, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(psa(x), plain(x), rtol=1e-5, atol=1e-5)
    assert len(tuning) == 1 and len(tuning[0]) == 4


def test_fixed_branch_forms_are_not_tuned(tuning, monkeypatch):
    timed = fake_timer(monkeypatch)
    _, plain = psa_pair()
    with torch.no_grad():
        plain(torch.randn(2, CHS, 8, 8))
    assert timed == []


def test_torchscript_and_compile_never_measure(tuning, monkeypatch):
    """Scripted and compiled PSAs run with tuning on, measure nothing, and compile has no graph break."""
    monkeypatch.setattr(_branch_tuning, 'measure', lambda *a: pytest.fail('measured while tracing'))
    psa, plain = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    scripted = torch.jit.script(psa)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(psa)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # (trace's check reruns the module in eager mode, where tuning does measure: the check is off)
    traced = torch.jit.trace(psa, x, check_trace=False)
    with torch.no_grad():
        for model in (scripted, traced):
            torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_measure_interleaves_and_skips_the_warm_up():
    order = []

    def call(name):
        def run():
            order.append(name)
            if name == 'bad':
                raise RuntimeError('unsupported')
        return run
    times = _branch_tuning.measure({'a': call('a'), 'bad': call('bad')}, torch.device('cpu'), warmup=True, repeats=2)
    assert order == ['a', 'bad'] * 3
    assert len(times['a']) == 2 and all(t >= 0 for t in times['a']) and times['bad'] == [float('inf')] * 2


def cuda_candidates_on_cpu(monkeypatch, triton: bool):
    """The candidates a CUDA device gets (the Triton kernels where `triton`), offered for CPU tensors."""
    candidates = _branch_tuning.candidates
    monkeypatch.setattr(_branch_tuning, 'triton_in_auto', lambda: triton)
    monkeypatch.setattr(_branch_tuning, 'candidates', lambda conv, device_type: candidates(conv, 'cuda'))


@pytest.mark.parametrize('triton', [False, True])
def test_cuda_candidates_add_the_wider_forms_and_the_triton_kernels(monkeypatch, triton):
    """On CUDA: dense and regrouped (where it is neither the grouped nor the dense conv) in both
    layouts, and where they run the tensor-core kernels in channels-last only (each kernel tried is
    a compile: not in NCHW, where they are several times slower, nor the CUDA-core kernels); the
    CPU's candidates stay as they were."""
    monkeypatch.setattr(_branch_tuning, 'triton_in_auto', lambda: triton)
    layouts = {'nchw', 'channels_last'}
    cpu = {('grouped', 'nchw'), ('grouped', 'channels_last'), ('depthwise', 'channels_last'), ('volumetric', 'nchw')}
    kernels = {('triton_mma', 'channels_last')} if triton else set()
    for conv in PyramidSqueezeAttention(CHS).convs[1:]:  # 4, 2, 1 outputs per group: merged by 2, 4, 8
        assert set(_branch_tuning.candidates(conv, 'cpu')) == cpu
        wider = {(f, lo) for f in ('dense', 'regrouped') for lo in layouts}
        assert set(_branch_tuning.candidates(conv, 'cuda')) == cpu | wider | kernels
    wide = BranchConv2d(32, 128, 9, groups=16, bias=False)  # 8 outputs per group: regrouped is the grouped conv
    few = BranchConv2d(16, 4, 5, groups=4, bias=False)  # 1 output per group: regrouped merges all 4, the dense conv
    for conv in (wide, few):
        assert set(_branch_tuning.candidates(conv, 'cuda')) == cpu | {('dense', lo) for lo in layouts} | kernels
    depthwise = BranchConv2d(16, 16, 9, groups=16, bias=False)  # 1 input per group
    assert set(_branch_tuning.candidates(depthwise, 'cuda')) == {('grouped', 'nchw'), ('grouped', 'channels_last')}


@pytest.mark.parametrize('training', [False, True])
def test_forms_that_cannot_run_here_are_dropped_and_regrouped_is_verified(monkeypatch, training):
    """The CUDA candidates checked on CPU tensors: the Triton kernels' custom ops refuse them (so the
    form is no candidate, and nothing raises), dense and regrouped compute the grouped conv."""
    cuda_candidates_on_cpu(monkeypatch, triton=True)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)  # which would run the kernels on CPU
    conv = PyramidSqueezeAttention(CHS).convs[2]
    x = torch.randn(2, CHS, 8, 8)
    inputs = {'nchw': x, 'channels_last': x.contiguous(memory_format=torch.channels_last)}
    verified = _branch_tuning.verified_candidates(conv, inputs, training)
    triton = {(form, layout) for form in ('triton', 'triton_mma') for layout in ('nchw', 'channels_last')}
    assert set(verified) == set(_branch_tuning.candidates(conv, 'cuda')) - triton


def test_training_candidates_need_the_grouped_conv_gradients(monkeypatch):
    """A form whose forward is right but whose gradients are not is a candidate for inference only."""
    conv = PyramidSqueezeAttention(CHS).convs[3]
    forward_as = type(conv).forward_as

    def wrong_backward(self, x, form):
        y = forward_as(self, x, form)
        return y.detach() + 2 * (y - y.detach()) if form == 'depthwise' else y  # same values, doubled gradients
    monkeypatch.setattr(type(conv), 'forward_as', wrong_backward)
    x = torch.randn(2, CHS, 8, 8)
    inputs = {'nchw': x, 'channels_last': x.contiguous(memory_format=torch.channels_last)}
    assert ('depthwise', 'channels_last') in _branch_tuning.verified_candidates(conv, inputs, False)
    assert ('depthwise', 'channels_last') not in _branch_tuning.verified_candidates(conv, inputs, True)


@pytest.mark.parametrize('training', [False, True])
def test_a_fastest_regrouped_plan_runs_and_computes_the_grouped_convs(tuning, monkeypatch, training):
    """The timing path end to end with the CUDA candidates: the regrouped form, timed fastest,
    is the plan; the Triton kernels (fastest of all, but unable to run here) are never timed."""
    cuda_candidates_on_cpu(monkeypatch, triton=True)
    psa, plain = psa_pair()
    psa.train(training), plain.train(training)
    times = {(i, ('regrouped', 'channels_last')): 0.01 for i in range(1, 4)}
    times |= {(i, (form, layout)): 1e-6 for i in range(4) for layout in ('nchw', 'channels_last')
              for form in ('triton', 'triton_mma')}
    timed = fake_timer(monkeypatch, times | {('convert', 'channels_last'): 0.0})
    x = torch.randn(2, CHS, 8, 8, requires_grad=training)
    with torch.set_grad_enabled(training):
        y, expected = psa(x), plain(x)
    assert tuning[0][1:] == [('regrouped', 'channels_last')] * 3
    assert not any(key[1][0] in ('triton', 'triton_mma') for key in timed[0] if key[0] != 'convert')
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    if training:
        for a, b in zip(torch.autograd.grad(y.sum(), [x, *psa.parameters()]),
                        torch.autograd.grad(expected.sum(), [x, *plain.parameters()])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def fused_kernels_on_cpu(monkeypatch, right=True):
    """Where the tensor-core kernels run, simulated on CPU: every reformulable branch verified on
    them ('triton_mma', channels-last), which compute the grouped conv, and the fused kernels of
    'triton_spc' computing the grouped convs (`right`) or twice them."""
    pytest.importorskip('triton')  # which branches fuse is decided by `_triton_spc.fusable`
    verified = _branch_tuning.verified_candidates

    def with_mma(conv, inputs, training):
        found = verified(conv, inputs, training)
        return found + [('triton_mma', 'channels_last')] if _branch_tuning.reformulable(conv) else found

    def spc_forward(self, x, members):
        y = torch.cat([self[i].forward_as(x, 'grouped') for i in members], dim=1)
        return y if right else 2 * y
    monkeypatch.setattr(_branch_tuning, 'verified_candidates', with_mma)
    monkeypatch.setattr(BranchConvs, '_spc_forward', spc_forward)
    monkeypatch.setattr(BranchConv2d, '_triton_forward', lambda self, x, tensor_cores: self.forward_as(x, 'grouped'))


def whole_fused_fastest(monkeypatch):
    """A timer under which every part costs the same and a whole plan with fused branches is the
    fastest; returns the whole plans timed."""
    timed = []

    def measure(calls, device, warmup=False, repeats=2):
        timed.extend(key[1] for key in calls if key[0] == 'plan')
        return {key: [0.1 if key[0] == 'plan' and any(f == 'triton_spc' for f, _ in key[1]) else 1.0] for key in calls}
    monkeypatch.setattr(_branch_tuning, 'measure', measure)
    return timed


def test_fused_plans_fuse_the_branches_verified_on_the_tensor_core_kernels():
    """The plan tried whole for 'triton_spc': every branch verified on the tensor-core kernels (in
    channels-last) fused, the others as in the parts' best; none where fewer than two would fuse."""
    pytest.importorskip('triton')
    convs = PyramidSqueezeAttention(CHS).convs  # kernels 5, 7 and 9 merge into the same input slice
    best = [('grouped', 'nchw')] * 4
    mma = [('grouped', 'nchw'), ('triton_mma', 'channels_last')]
    assert _branch_tuning.fused_plans(convs, [best[:1]] + [mma] * 3, best) == [
        [('grouped', 'nchw')] + [('triton_spc', 'channels_last')] * 3]
    assert _branch_tuning.fused_plans(convs, [best[:1]] * 3 + [mma], best) == []  # one branch: nothing to fuse
    assert _branch_tuning.fused_plans(convs, [best[:1]] * 4, best) == []


@pytest.mark.parametrize('training', [False, True])
def test_a_fused_plan_fastest_whole_is_the_plan(tuning, monkeypatch, training):
    """Where the tensor-core kernels run, the plan fusing the branches that share input slices
    ('triton_spc'), which parts timed alone cannot price, is timed whole beside the rules' plan and
    taken when faster; the PSA then computes the grouped convs, gradients included."""
    fused_kernels_on_cpu(monkeypatch)
    timed = whole_fused_fastest(monkeypatch)
    psa, plain = psa_pair()
    psa.train(training), plain.train(training)
    x = torch.randn(2, CHS, 8, 8, requires_grad=training)
    with torch.set_grad_enabled(training):
        y, expected = psa(x), plain(x)
    assert tuning[0][1:] == [('triton_spc', 'channels_last')] * 3 and tuple(tuning[0]) in timed
    assert tuple(rules(psa, training)) in timed
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    if training:
        for a, b in zip(torch.autograd.grad(y.sum(), [x, *psa.parameters()]),
                        torch.autograd.grad(expected.sum(), [x, *plain.parameters()])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('training', [False, True])
def test_a_wrong_fused_plan_is_never_timed(tuning, monkeypatch, training):
    """Fused kernels that do not compute the grouped convs on the real input are not a candidate,
    and a rules' plan that fuses branches (CUDA with TIMM_EPSANET_TRITON=1) runs them alone there."""
    fused_kernels_on_cpu(monkeypatch, right=False)
    timed = whole_fused_fastest(monkeypatch)
    psa, plain = psa_pair()
    plan_for = BranchConv2d.plan_for
    monkeypatch.setattr(BranchConv2d, 'plan_for', lambda self, *args: (
        ('triton_spc', 'channels_last') if self.form == 'auto' and _branch_tuning.reformulable(self)
        else plan_for(self, *args)))
    psa.train(training), plain.train(training)
    x = torch.randn(2, CHS, 8, 8, requires_grad=training)
    with torch.set_grad_enabled(training):
        y, expected = psa(x), plain(x)
    assert not any(form == 'triton_spc' for plan in timed for form, _ in plan)
    assert tuning[0][1:] == [('triton_mma', 'channels_last')] * 3
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', ['triton removed', 'kernels switched off', 'written before the switch counted'])
def test_a_cached_triton_plan_runs_only_where_its_kernels_were_candidates_and_run(tuning, monkeypatch, case):
    """A plan of Triton kernels in the cache is measured anew, rather than run or failing the
    forward: read where triton cannot run; or by a process without TIMM_EPSANET_TRITON=1, whose
    plans are kept apart (the tuner tries the kernels only with it: they compile on first use); or
    from an entry that does not say the kernels were candidates."""
    psa, plain = psa_pair()
    x = torch.randn(2, CHS, 8, 8)
    writer_had_kernels = case != 'written before the switch counted'
    monkeypatch.setattr(_branch_tuning, 'triton_candidates', lambda device_type: writer_had_kernels)
    fake_timer(monkeypatch)
    with torch.no_grad():
        psa(x)
    path = _branch_tuning.cache_path(x.device)
    data = json.loads(path.read_text())
    (key,) = data['plans']
    assert (_branch_tuning.TRITON_KEY in key) == writer_had_kernels
    triton_plan = [['grouped', 'nchw'], ['triton', 'channels_last']] + [['triton_mma', 'channels_last']] * 2
    data['plans'][key] = triton_plan
    path.write_text(json.dumps(data))
    _branch_tuning._state.tables.clear()  # a new process
    monkeypatch.setattr(_branch_tuning, 'triton_runs_on_cuda', lambda: case != 'triton removed')
    monkeypatch.setattr(_branch_tuning, 'triton_candidates', lambda device_type: case == 'triton removed')
    timed = fake_timer(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(psa(x), plain(x), rtol=1e-5, atol=1e-5)
    assert len(timed) == 1
    plans = json.loads(path.read_text())['plans']
    measured = [plan for plan in plans.values() if plan != triton_plan]
    assert len(measured) == 1 and all(form not in ('triton', 'triton_mma') for form, _ in measured[0])
    # switched off: the entry measured with the kernels stays for the processes that run them
    assert (triton_plan in plans.values()) == (case == 'kernels switched off')


class GradOneBf16UlpOff(torch.autograd.Function):
    """Identity whose gradient moves by about one bf16 rounding step: a weight gradient summed in
    another order and rounded to bf16 (as a GPU's 16-bit weight gradient is before it reaches the
    fp32 weight)."""

    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return (grad * (1 + 2 ** -8)).to(torch.bfloat16).to(grad.dtype)


def test_autocast_training_candidates_are_checked_at_the_compute_precision(monkeypatch):
    """Under autocast the fp32 weight's gradient is computed in the 16-bit dtype and rounded there:
    every gradient is checked at the compute dtype's precision, so no correct form is dropped for
    a different rounding."""
    cuda_candidates_on_cpu(monkeypatch, triton=False)
    torch.manual_seed(0)
    conv = PyramidSqueezeAttention(CHS).convs[3]
    forward_as = type(conv).forward_as

    def dense_rounds_its_weight_grad_otherwise(self, x, form):
        if form != 'dense':
            return forward_as(self, x, form)
        weight = GradOneBf16UlpOff.apply(self.weight)
        return torch.nn.functional.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
    monkeypatch.setattr(type(conv), 'forward_as', dense_rounds_its_weight_grad_otherwise)
    x = torch.randn(2, CHS, 8, 8)
    inputs = {'nchw': x, 'channels_last': x.contiguous(memory_format=torch.channels_last)}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        verified = _branch_tuning.verified_candidates(conv, inputs, True)
    assert set(verified) == set(_branch_tuning.candidates(conv, 'cuda'))


def test_training_timings_include_the_input_gradient(monkeypatch):
    """A PSA's input follows a trained layer, so the model's backward runs through it: the tuner's
    timed training calls (each branch, the convert, the whole PSA) compute that gradient too.
    Forms differ most in it; without it the tuner picked plans that trained 25% slower."""
    x = torch.randn(2, CHS, 9, 9).requires_grad_()
    grads_wrt, timing = [], []
    grad = torch.autograd.grad

    def recording_grad(outputs, inputs, *args, **kwargs):
        if timing:
            grads_wrt.append(any(t.shape == x.shape for t in inputs))
        return grad(outputs, inputs, *args, **kwargs)

    def measure(calls, device, warmup=False, repeats=2):
        timing.append(True)
        try:
            for call in calls.values():
                call()
        finally:
            timing.pop()
        return {key: [1.0] for key in calls}  # ties: the rules' plan stays, every call ran once

    monkeypatch.setattr(torch.autograd, 'grad', recording_grad)
    monkeypatch.setattr(_branch_tuning, 'measure', measure)
    convs = PyramidSqueezeAttention(CHS).convs
    _branch_tuning.tune(convs, x, training=True)
    assert grads_wrt and all(grads_wrt), grads_wrt
    grads_wrt.clear()
    _branch_tuning.tune(convs, x.detach(), training=True)  # an input that needs no gradient: none timed
    assert grads_wrt and not any(grads_wrt), grads_wrt
