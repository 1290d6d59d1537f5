""" Branch plans measured where the model runs, the way `torch.backends.cudnn.benchmark` picks
conv algorithms. Off by default: `set_branch_tuning(True)` or TIMM_EPSANET_TUNE=1.

The rules of `_branch_plans` were tuned by hand on two machines and do not carry over to other
CPUs, thread counts or GPUs. With tuning on, the first eager forward of each distinct PSA (its
branch shapes, input size bucket, dtype, caller layout, inference or training) on each device
times candidate (form, layout) plans on that forward's input, and keeps the fastest. The plan is
kept in memory and in a JSON file per device, torch version and package version, so that a second
process does not pay again.

The unit is a PSA's `BranchConvs`, not a single branch: branches planned in the same layout share
one converted copy of the input, so a branch's best layout depends on the others'. Each candidate
(form, layout) of each branch, and the convert, is timed alone (far cheaper than timing every
plan of the whole PSA); the plan of least total cost replaces the rules' plan only when the whole
PSA, timed under both, confirms it clearly, so that noise on a busy machine keeps the rules.
Where the tensor-core kernels run, plans that fuse the branches sharing merged input slices
('triton_spc') cannot be timed branch by branch: they are timed whole beside the other two.
Every candidate is first checked against the plain grouped conv on the real input; one that
raises, or gives a non-finite or different output, is never used.

Nothing is timed while torch.compile, torch.jit.trace, FX or a dispatch mode (e.g. FlopCounterMode)
is tracing the model: those use the rules. TorchScript never reaches this module.
"""
import itertools
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._branch_plans import (
    TRITON_FORMS, Plan, autocast_dtype, env_setting, in_layout, kernel_layout, layout_of, next_pow2,
    triton_in_auto, triton_runs_on_cuda,
)

try:
    import fcntl
except ImportError:  # Windows: writes stay atomic, concurrent writers may drop each other's new entries
    fcntl = None

__all__ = ['set_branch_tuning']

ENV_SWITCH = 'TIMM_EPSANET_TUNE'
ENV_CACHE_DIR = 'TIMM_EPSANET_TUNE_CACHE_DIR'
CACHE_FORMAT = 1
LAYOUTS = ('nchw', 'channels_last')
# timed calls of each candidate, after the verifying call that warms it up; the fastest counts
# (other load on the machine only ever slows a call down)
REPEATS = 2
# a change of plan must be this much faster than the plan it replaces; noise must not flip plans
MARGIN = 0.97
# calls of the whole PSA under the rules' plan and under a new plan, to confirm the new one
CONFIRM_REPEATS = 3
# largest difference from the grouped conv, relative to its largest output, a candidate may show
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
LOW_PRECISION_TOLERANCE = 3e-2
# in the key of a plan measured with the Triton kernels among the candidates
TRITON_KEY = 'kernels=triton|'


def _env_flag(value: Optional[str]) -> bool:
    return env_setting(ENV_SWITCH, value, 'branch tuning stays off') == 'on'


class _State:
    def __init__(self):
        self.enabled = _env_flag(os.environ.get(ENV_SWITCH))
        self.cache_dir: Optional[Path] = None  # None: $TIMM_EPSANET_TUNE_CACHE_DIR or the XDG cache
        self.persistent = True
        self.lock = threading.RLock()
        # (cache file or None, header) -> {entry key: plan}
        self.tables: Dict[Tuple[Optional[str], Tuple[str, ...]], Dict[str, List[Plan]]] = {}
        self.warned: set = set()


_state = _State()


def set_branch_tuning(
        enabled: bool = True,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        persistent: bool = True,
) -> bool:
    """Measure PSA branch plans on first use (True) or use the built-in rules (False, the default).

    Also switched on by the environment variable TIMM_EPSANET_TUNE=1 at import.

    Args:
        enabled: whether eager forwards measure and use per-machine branch plans.
        cache_dir: folder of the on-disk plan cache; default $TIMM_EPSANET_TUNE_CACHE_DIR, else
            $XDG_CACHE_HOME/timm_epsanet (~/.cache/timm_epsanet).
        persistent: False keeps measured plans in memory only.
    Returns:
        whether tuning was enabled before the call.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f'set_branch_tuning(enabled=...) takes True or False, got {enabled!r}')
    if not isinstance(persistent, bool):
        raise TypeError(f'set_branch_tuning(persistent=...) takes True or False, got {persistent!r}')
    with _state.lock:
        previous = _state.enabled
        _state.enabled = enabled
        _state.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        _state.persistent = persistent
    return previous


def cache_dir() -> Path:
    if _state.cache_dir is not None:
        return _state.cache_dir
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'timm_epsanet'


def tuned_plans(convs: Sequence[torch.nn.Conv2d], x: torch.Tensor, grad_enabled: bool) -> Optional[List[Plan]]:
    """The measured plan of `convs` (a `BranchConvs`) for input `x`, measuring it now if it is
    new; None where the rules apply: tuning off, or tracing, or a device or PSA not tuned."""
    if not _state.enabled:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy):
        return None
    if x.device.type not in ('cpu', 'cuda') or _get_current_dispatch_mode() is not None:
        return None
    if any(conv.form != 'auto' and reformulable(conv) for conv in convs):
        return None  # a branch_form chosen by the caller stays as it is
    key = entry_key(convs, x, grad_enabled)
    with _state.lock:
        table, path = _table(x.device)
        plans = table.get(key)
        if plans is not None and len(plans) == len(convs):
            return plans
        plans = tune(convs, x, grad_enabled)
        if plans is None:
            return None
        table[key] = plans
        if path is not None:
            _save(path, _header(x.device), key, plans)
    return plans


def reformulable(conv: torch.nn.Conv2d) -> bool:
    """Whether a branch has forms other than the grouped conv (see `BranchConv2d.__init__`)."""
    return conv.groups > 1 and conv.in_channels > conv.groups and conv.bias is None


def candidates(conv: torch.nn.Conv2d, device_type: str) -> List[Plan]:
    """The (form, layout) plans tried for one branch.

    On CUDA also the forms of more MACs on wider groups (dense; regrouped, where it differs from
    both grouped and dense), which pay on GPUs and never on CPUs, in both layouts, and with the
    Triton kernels switched on (`triton_candidates`) the tensor-core kernels in the layout they are
    written for (`kernel_layout`). Each Triton kernel tried is compiled on first use (seconds
    each), so candidates that cannot win are left out: the kernels in NCHW, and the CUDA-core
    kernels ('triton'), whose multiply-adds at the CUDA cores' peak take about 4x as long as the
    tensor-core kernels' at theirs (`cuda_branch_form`).
    """
    if not reformulable(conv):
        return [('grouped', layout) for layout in LAYOUTS]
    plans = [('grouped', 'nchw'), ('grouped', 'channels_last'), ('depthwise', 'channels_last'), ('volumetric', 'nchw')]
    if device_type == 'cuda':
        forms = ['dense']
        if 1 < conv.regroup < conv.groups:
            forms.append('regrouped')
        plans += [(form, layout) for form in forms for layout in LAYOUTS]
        if triton_candidates(device_type):  # a branch alone: 'triton_spc' fuses branches, and alone is 'triton_mma'
            plans.append(('triton_mma', kernel_layout('triton_mma')))
    return plans


def triton_candidates(device_type: str) -> bool:
    """Whether the tuner tries the Triton kernels: on CUDA where 'auto' runs them
    (TIMM_EPSANET_TRITON=1 and triton runs). Each kernel a candidate needs compiles on its first
    use, which makes a model's first tuned step cost minutes on an empty Triton cache; so they are
    tried only where the user has taken them on, and tuning the cuDNN forms alone costs seconds."""
    return device_type == 'cuda' and triton_in_auto()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dtype = autocast_dtype(x.device.type) if x.is_floating_point() else None
    return x.dtype if dtype is None else dtype


def entry_key(convs: Sequence[torch.nn.Conv2d], x: torch.Tensor, training: bool) -> str:
    """What a plan depends on, besides the device: mode (training with or without the input's
    gradient: a frozen layer before the PSA skips it, and `tune` times what runs), compute dtype,
    caller layout, CPU threads, input size (batch and each side rounded up to a power of two), and
    every branch's conv; on CUDA whether the Triton kernels are candidates (and the rules' plan)."""
    B, C, H, W = x.shape
    mode = ('train' if x.requires_grad else 'train_frozen_input') if training else 'infer'
    threads = f'threads={torch.get_num_threads()}|' if x.device.type == 'cpu' else ''
    kernels = TRITON_KEY if triton_candidates(x.device.type) else ''
    branches = ';'.join(
        f'k{c.kernel_size[0]}x{c.kernel_size[1]},g{c.groups},{c.in_channels}->{c.out_channels},'
        f's{c.stride[0]}x{c.stride[1]},p{c.padding[0]}x{c.padding[1]},d{c.dilation[0]}x{c.dilation[1]}'
        for c in convs)
    return (f'{mode}|{str(compute_dtype(x)).replace("torch.", "")}|{layout_of(x)}|'
            f'{threads}{kernels}n{next_pow2(B)}|{next_pow2(H)}x{next_pow2(W)}|{branches}')


_DEVICE_NAMES: Dict[Tuple[str, Optional[int]], str] = {}


def device_name(device: torch.device) -> str:
    """CPU: the model name and the instruction set torch's kernels use; CUDA: the GPU's name."""
    key = (device.type, device.index)
    if key not in _DEVICE_NAMES:
        if device.type == 'cuda':
            _DEVICE_NAMES[key] = torch.cuda.get_device_name(device)
        else:
            _DEVICE_NAMES[key] = f'{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})'
    return _DEVICE_NAMES[key]


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (Linux: /proc/cpuinfo), with family and model
    numbers where known: virtual machines often report a generic name ('Intel(R) Xeon(R)
    Processor') for CPUs of different generations, which time branch forms differently."""
    import platform
    try:
        with open('/proc/cpuinfo') as f:
            lines = [line.split(':', 1) for line in f.read().splitlines() if ':' in line]
        info = {}
        for key, value in lines:
            info.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        info = {}
    name = info.get('model name') or platform.processor() or platform.machine() or 'cpu'
    if 'cpu family' in info and 'model' in info:
        name += f' (family {info["cpu family"]}, model {info["model"]})'
    return name


def _header(device: torch.device) -> Tuple[str, ...]:
    from . import __version__
    return device_name(device), torch.__version__, __version__


def cache_path(device: torch.device) -> Path:
    """One file per device, torch version and package version."""
    name = '-'.join(_header(device))
    return cache_dir() / (re.sub(r'[^A-Za-z0-9._+-]+', '_', name).strip('_') + '.json')


def _table(device: torch.device) -> Tuple[Dict[str, List[Plan]], Optional[Path]]:
    path = cache_path(device) if _state.persistent else None
    header = _header(device)
    table_key = (str(path) if path is not None else None, header)
    if table_key not in _state.tables:
        _state.tables[table_key] = _read(path, header) if path is not None else {}
    return _state.tables[table_key], path


def _warn_once(message: str) -> None:
    if message not in _state.warned:
        _state.warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read(path: Path, header: Tuple[str, ...]) -> Dict[str, List[Plan]]:
    """The plans in a cache file; a missing file is empty, a corrupt or foreign one is ignored."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, UnicodeDecodeError) as e:
        _warn_once(f'timm_epsanet branch tuning: cannot read the plan cache {path} ({e}); measuring anew')
        return {}
    try:
        return _parse(json.loads(text), header)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        _warn_once(f'timm_epsanet branch tuning: ignoring the plan cache {path}: {e}')
        return {}


def _parse(data, header: Tuple[str, ...]) -> Dict[str, List[Plan]]:
    from ._branch_conv import BRANCH_FORMS
    if not isinstance(data, dict) or data.get('format') != CACHE_FORMAT:
        raise ValueError(f'not a format-{CACHE_FORMAT} plan cache')
    found = (data.get('device'), data.get('torch'), data.get('timm_epsanet'))
    if found != header:
        raise ValueError(f'written for {found}, not for {header}')
    plans = {}
    triton = triton_runs_on_cuda()
    for key, plan in data['plans'].items():
        plan = [tuple(choice) for choice in plan]
        if not isinstance(key, str) or not plan or any(
                len(choice) != 2 or choice[0] not in BRANCH_FORMS[1:] or choice[1] not in LAYOUTS for choice in plan):
            raise ValueError(f'invalid plan {plan!r} for {key!r}')
        # a plan of Triton kernels only where they run and were candidates: else measure anew
        if all(form not in TRITON_FORMS for form, _ in plan) or (triton and TRITON_KEY in key):
            plans[key] = plan
    return plans


def _save(path: Path, header: Tuple[str, ...], key: str, plan: List[Plan]) -> None:
    """Add one plan to the cache file: under a lock, merged with what other processes wrote,
    replaced atomically. A failure to write keeps the plan in memory only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            plans = _read(path, header)
            plans[key] = plan
            device, torch_version, version = header
            data = dict(format=CACHE_FORMAT, device=device, torch=torch_version, timm_epsanet=version, plans=plans)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
            try:
                with os.fdopen(fd, 'w') as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError as e:
        _warn_once(f'timm_epsanet branch tuning: cannot write the plan cache {path} ({e}); plans stay in memory')


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + '.lock'), 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tune(convs, x: torch.Tensor, training: bool) -> Optional[List[Plan]]:
    """The fastest verified plan of `convs` on `x`; None when `x` gives non-finite outputs.

    Each verified (branch, form, layout) and the convert of `x` to the other layout are timed
    alone, interleaved; a plan costs its branches plus the convert when it uses the other
    layout. The cheapest plan replaces the rules' plan when the whole PSA confirms it.
    """
    # the model's backward runs through x too (it follows a trained layer): time that gradient
    input_grad = training and x.requires_grad
    x = x.detach()
    caller = layout_of(x)
    other = LAYOUTS[1 - LAYOUTS.index(caller)]
    inputs = {caller: x, other: in_layout(x, other)}
    options = []
    for conv in convs:
        verified = verified_candidates(conv, inputs, training)
        if verified is None:
            return None
        options.append(verified)
    calls = {('convert', other): _call(lambda x_in: in_layout(x_in, other), x, [], training, input_grad)}
    for i, (conv, verified) in enumerate(zip(convs, options)):
        params = [conv.weight] if conv.weight.requires_grad else []
        for form, layout in verified:
            calls[(i, (form, layout))] = _call(
                partial(conv.forward_as, form=form), inputs[layout], params, training, input_grad)
    times = {key: min(seconds) for key, seconds in measure(calls, x.device).items()}

    def cost(plan):
        converts = times[('convert', other)] if any(layout == other for _, layout in plan) else 0.0
        return converts + sum(times[(i, alone(choice))] for i, choice in enumerate(plan))

    # the rules' plan, with 'any' resolved as `BranchConvs.run_plans` resolves it
    low_precision = x.device.type == 'cpu' and compute_dtype(x) != torch.float32
    rules = [conv.plan_for(x.device.type, training, low_precision) for conv in convs]
    flexible = 'channels_last' if any(layout == 'channels_last' for _, layout in rules) else caller
    rules = [(form, flexible if layout == 'any' else layout) for form, layout in rules]
    rules = [choice if alone(choice) in verified else ('grouped', caller) for choice, verified in zip(rules, options)]
    if not plan_verified(convs, x, rules, training):  # its fused branches wrong here: each alone
        rules = [alone(choice) for choice in rules]
    best = min((list(plan) for plan in itertools.product(*options)), key=cost)
    contenders = [best] if best != rules and cost(best) < cost(rules) else []
    contenders += [plan for plan in fused_plans(convs, options, best)
                   if plan != rules and plan_verified(convs, x, plan, training)]
    if not contenders:
        return rules
    # the sum of the parts misses what branches share or add (memory traffic, the concat, fused
    # kernels): a plan replaces the rules' only when the whole PSA confirms it, every call of it
    # faster than every call of the rules' plan (on a busy machine the rules stay)
    params = [p for p in convs.parameters() if p.requires_grad]
    trial = partial(convs.run_plans, as_modules=False)  # no hook sees the trials
    whole = {('plan', tuple(plan)): _call(partial(trial, plans=plan), x, params, training, input_grad)
             for plan in [rules] + contenders}
    seconds = measure(whole, x.device, warmup=True, repeats=CONFIRM_REPEATS)
    winner = min(contenders, key=lambda plan: min(seconds[('plan', tuple(plan))]))
    new, old = seconds[('plan', tuple(winner))], seconds[('plan', tuple(rules))]
    return winner if max(new) < min(old) and min(new) < MARGIN * min(old) else rules


def alone(choice: Plan) -> Plan:
    """The (form, layout) a branch of `choice` is when it runs alone: 'triton_spc' is 'triton_mma'."""
    return ('triton_mma', choice[1]) if choice[0] == 'triton_spc' else choice


def fused_plans(convs, options: Sequence[List[Plan]], best: List[Plan]) -> List[List[Plan]]:
    """The plan that fuses the branches sharing merged input slices ('triton_spc'): every branch
    verified on the tensor-core kernels ('triton_mma', tried in their layout only: `candidates`)
    fused, the others as in `best`; none where fewer than two branches fuse."""
    kernels = ('triton_mma', kernel_layout('triton_mma'))
    plan = [('triton_spc', kernels[1]) if kernels in verified else choice for verified, choice in zip(options, best)]
    fuses = any(form == 'triton_spc' for form, _ in plan) and convs.spc_runs(plan, [layout for _, layout in plan])
    return [plan] if fuses else []


def plan_verified(convs, x: torch.Tensor, plan: List[Plan], training: bool) -> bool:
    """Whether a plan that fuses branches ('triton_spc') computes the grouped convs on `x` (output,
    and in training the input and weight gradients); plans without fused branches are made of
    verified candidates already."""
    if not any(form == 'triton_spc' for form, _ in plan):
        return True
    caller = layout_of(x)
    grouped = [('grouped', caller)] * len(convs)
    expected = _outputs_and_grads(partial(convs.run_plans, plans=grouped, as_modules=False), convs, x, training)
    try:
        got = _outputs_and_grads(partial(convs.run_plans, plans=plan, as_modules=False), convs, x, training,
                                 grad_out=expected[0])
    except Exception:  # the fused kernels cannot run this: not a candidate
        return False
    return _matches(got, expected)


def verified_candidates(conv, inputs: Dict[str, torch.Tensor], training: bool) -> Optional[List[Plan]]:
    """The candidates of `conv` whose output (and in training, whose input and weight gradients)
    match the grouped conv's on `inputs` (the input in each layout); None when the grouped conv's
    own output is not finite (nothing to check against). This is also each candidate's warm-up
    before `measure`, backward included."""
    expected = _outputs_and_grads(partial(conv.forward_as, form='grouped'), [conv], inputs['nchw'], training)
    if not all(bool(torch.isfinite(t).all()) for t in expected):
        return None
    verified = []
    for form, layout in candidates(conv, inputs['nchw'].device.type):
        try:
            got = _outputs_and_grads(partial(conv.forward_as, form=form), [conv], inputs[layout], training,
                                     grad_out=expected[0])
            ok = _matches(got, expected)
        except Exception:  # a form this device or dtype cannot run is simply not a candidate
            ok = False
        if ok:
            verified.append((form, layout))
    return verified


def _matches(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> bool:
    """Whether outputs and gradients equal the grouped conv's, finite, within the compute dtype's
    tolerance of each one's largest value (the output's dtype is the compute dtype: under
    autocast an fp32 weight's gradient is computed in it too)."""
    tol = TOLERANCE.get(expected[0].dtype, LOW_PRECISION_TOLERANCE)
    return all(a.shape == b.shape and bool(torch.isfinite(a).all())
               and float((a.float() - b.float()).abs().max()) <= tol * (float(b.abs().max()) + 1e-6)
               for a, b in zip(got, expected))


def _outputs_and_grads(fn: Callable[[torch.Tensor], torch.Tensor], convs, x: torch.Tensor, training: bool,
                       grad_out: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """[fn(x)]; in training also its gradients in x and in the weights of `convs` (those that
    train) for `grad_out` (default: the output itself), returned, not accumulated."""
    if not training:
        with torch.no_grad():
            return [fn(x)]
    x_in = x.detach().requires_grad_()
    wrt = [x_in] + [conv.weight for conv in convs if conv.weight.requires_grad]
    with torch.enable_grad():
        y = fn(x_in)
        grads = torch.autograd.grad(y, wrt, y.detach() if grad_out is None else grad_out)
    return [y.detach(), *grads]


def _call(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: List[torch.Tensor], training: bool,
          input_grad: bool):
    """A call of `fn(x)` as the model makes it: in training with its backward (to `params`, and
    to x with `input_grad`), the gradients returned rather than accumulated into the parameters."""
    def call():
        if not training:
            with torch.no_grad():
                fn(x)
            return
        x_in = x.detach().requires_grad_(input_grad)
        wrt = ([x_in] if input_grad else []) + params
        with torch.enable_grad():
            y = fn(x_in)
            if wrt:
                torch.autograd.grad(y, wrt, torch.ones_like(y))
    return call


def measure(
        calls: Dict[Hashable, Callable[[], None]],
        device: torch.device,
        warmup: bool = False,
        repeats: int = REPEATS,
) -> Dict[Hashable, List[float]]:
    """Seconds of `repeats` calls of each (after one untimed call with `warmup`), the calls
    interleaved so that other load on the machine, which drifts, hits them alike. A call that
    raises costs inf."""
    sync = partial(torch.cuda.synchronize, device) if device.type == 'cuda' else (lambda: None)
    times: Dict[Hashable, List[float]] = {key: [] for key in calls}
    for rep in range(repeats + int(warmup)):
        for key, call in calls.items():
            try:
                sync()
                start = time.perf_counter()
                call()
                sync()
                seconds = time.perf_counter() - start
            except Exception:
                seconds = math.inf
            if rep >= int(warmup):
                times[key].append(seconds)
    return times
