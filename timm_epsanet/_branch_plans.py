""" Which form and memory layout a PSA branch runs in, per device.

A plan is (form, layout): a form of `_branch_forms` ('grouped', 'depthwise', 'volumetric',
'dense', 'regrouped') or one of `TRITON_FORMS` (`_triton_branch`, `_triton_spc`; CUDA only) and
'nchw', 'channels_last', or 'any' (channels-last when the PSA has a channels-last copy of its input
anyway, else NCHW). The rules come from per-branch and per-PSA timings (benchmarks/psa_branches.py,
benchmarks/psa_plans.py; their results and the numbers behind each rule are in
benchmarks/README.md): on CPU from two machines, on CUDA from an H200's (`cuda_branch_form`; the
Triton kernels' use from arithmetic, until a GPU times them whole).
"""
import functools
import importlib.metadata
import importlib.util
import os
import re
import warnings
from typing import Iterable, Optional, Tuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

Plan = Tuple[str, str]

# the forms run by the Triton kernels (`_triton_branch`, `_triton_spc`): CUDA cores, tensor cores, tensor
# cores with the branches that share input slices fused; CUDA only
TRITON_FORMS = ('triton', 'triton_mma', 'triton_spc')

# the oldest triton the kernels are checked with (3.6, the GPU machines'; benchmarks/README.md)
TRITON_MIN = (3, 6)

# found without importing it: importing this package must not need (or load) triton
TRITON_INSTALLED = importlib.util.find_spec('triton') is not None


def env_setting(name: str, value: Optional[str], off_means: str, others: Tuple[str, ...] = ()) -> str:
    """An environment switch read: 'on' (1, true, yes, on), one of `others`, or 'off' (unset, 0,
    false, no, off; anything else warns, saying `off_means`)."""
    setting = (value or '').strip().lower()
    if setting in ('', '0', 'false', 'no', 'off'):
        return 'off'
    if setting in ('1', 'true', 'yes', 'on'):
        return 'on'
    if setting in others:
        return setting
    accepted = ', '.join(('1/true/yes/on',) + others)
    warnings.warn(f'{name}={value!r} is not one of {accepted} or 0/false/no/off: {off_means}')
    return 'off'


# 'auto' takes the Triton kernels on CUDA only when asked to, until they are measured on a GPU
# against cuDNN (benchmarks/run_cuda.sh); branch_form='triton', 'triton_mma' or 'triton_spc' use them
# regardless. TIMM_EPSANET_TRITON=1: the branches' kernels and the attention's; =attention: the
# attention's alone (`_triton_attention`, two kernels for its dozen small ops), the branches on cuDNN
_TRITON_SETTING = env_setting('TIMM_EPSANET_TRITON', os.environ.get('TIMM_EPSANET_TRITON'),
                              'the Triton kernels stay off', others=('attention',))
TRITON_IN_AUTO = _TRITON_SETTING == 'on'
TRITON_ATTENTION_IN_AUTO = _TRITON_SETTING == 'attention'


@functools.lru_cache(maxsize=None)  # read once, when a Triton form is first considered: not at import
def triton_version() -> Optional[Tuple[int, int]]:
    """The installed triton's (major, minor), read from its distribution without importing it;
    None where triton is missing or no distribution says (a source build: then it is not refused)."""
    for dist in ('triton', 'pytorch-triton') if TRITON_INSTALLED else ():
        try:
            match = re.match(r'(\d+)\.(\d+)', importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
        return (int(match.group(1)), int(match.group(2))) if match else None
    return None


def triton_too_old() -> bool:
    version = triton_version()
    return version is not None and version < TRITON_MIN


def triton_too_old_message() -> str:
    found = '.'.join(map(str, triton_version() or ()))
    return f'the PSA Triton kernels need triton >= {".".join(map(str, TRITON_MIN))}, found triton {found}'


def warn_if_triton_ignored() -> None:
    """At import: TIMM_EPSANET_TRITON=1 (or =attention) with a triton the kernels refuse says so, once."""
    if (TRITON_IN_AUTO or TRITON_ATTENTION_IN_AUTO) and triton_too_old():
        value = '1' if TRITON_IN_AUTO else 'attention'
        warnings.warn(f'TIMM_EPSANET_TRITON={value} is ignored: {triton_too_old_message()}; PSA runs on cuDNN '
                      f'and plain ops')


warn_if_triton_ignored()


def cpu_branch_plan(
        kernel_size: int,
        in_per_group: int,
        outs_per_group: int,
        groups: int = 1,
        stride: int = 1,
        training: bool = False,
        low_precision: bool = False,
) -> Plan:
    """(form, layout) in which a PSA branch conv runs fastest on CPU (oneDNN).

    * Few outputs per group (1-2, or up to 4 for kernels of 5 and more): the depthwise form,
      channels-last. oneDNN's grouped convs of that shape run far below its depthwise kernels.
    * Inference with a full AVX-512 vector of groups (16 or more) and 2-4 outputs per group, at
      stride 1: the volumetric form, which needs NCHW but skips the depthwise form's group sum.
    * Grouped convs with many inputs per group and kernels of 5 and more: NCHW at inference (the
      convert is paid once per PSA), the caller's layout in training, where NCHW wins by less.
      At stride 2 the same from 16 inputs per group with at most 16 groups.
    * Other grouped convs: channels-last; the dense branch is as fast in either layout.
    * bf16 (`low_precision`, e.g. CPU autocast): oneDNN's bf16 depthwise convs are slower, so
      the depthwise form only for kernels of 5 and more with 1-2 outputs per group.
    """
    if low_precision:
        if in_per_group > 1 and outs_per_group <= 2 and kernel_size >= 5:
            return 'depthwise', 'channels_last'
        return 'grouped', 'channels_last'
    if in_per_group == 1:  # a depthwise conv already
        return 'grouped', 'any'
    if not training:
        if stride == 1 and groups >= 16 and 2 <= outs_per_group <= 4:
            return 'volumetric', 'nchw'
        if stride > 1 and groups <= 16 and in_per_group >= 16 and kernel_size >= 5:
            return 'grouped', 'nchw'
    if outs_per_group <= 2 or (outs_per_group <= 4 and kernel_size >= 5):
        return 'depthwise', 'channels_last'
    if in_per_group >= 32 and kernel_size >= 5:
        return 'grouped', 'any' if training else 'nchw'
    return 'grouped', 'channels_last'


def cuda_branch_form(
        groups: int,
        training: bool,
        in_per_group: int,
        triton: bool,
        out_channels: int,
        stride: int = 1,
) -> str:
    """The form of a PSA branch on CUDA, in the caller's layout.

    With `triton` (`triton_in_auto`): every grouped branch on the Triton tensor-core kernels,
    those that read the same merged input slices fused ('triton_spc': the same products from
    fewer reads of the input). Not the CUDA-core kernels ('triton'): EPSANet's grouped branches
    hold more multiply-adds than CUDA cores can run, even at their peak, in the time a
    ResNet-50-class budget leaves them, while merged groups on tensor cores cost a few times the
    MACs at many times the rate (benchmarks/branch_macs.py). Otherwise cuDNN, whose grouped
    kernels are slowest with few outputs per group: there the dense form (the groups merged
    block-diagonally into one, groups times the MACs on cuDNN's fast dense kernels) costs less,
    while the branch is narrow. Up to 16 groups of at most 8 outputs in a branch of at most 64
    outputs: the dense form; wider branches (a late stage's, where a large kernel on a small
    image mostly multiplies padding) and, in training, strided branches (whose dense backward
    costs more than it saves): the grouped conv.
    """
    if triton and in_per_group > 1:
        return 'triton_spc'
    narrow = groups <= 16 and out_channels // groups <= 8 and out_channels <= 64
    return 'dense' if narrow and (not training or stride == 1) else 'grouped'


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n < 1), in plain Python (a kernel tile's side, the
    size buckets of tuned plans): `triton.next_power_of_2` is a constexpr function, whose call
    from the host costs microseconds."""
    return 1 << max(n - 1, 0).bit_length()


def kernel_layout(form: str) -> str:
    """The layout a branch of `form` runs in off the CPU: channels-last for the Triton kernels, the
    caller's ('any') for the others. The kernels load each pixel's channels as one contiguous
    vector (straight into shared memory for the tensor cores); built for NCHW strides their
    loops are several times longer and spill (benchmarks/triton_sass.py --layout nchw), so an
    NCHW input is converted once per PSA instead."""
    return 'channels_last' if form.startswith('triton') else 'any'  # TRITON_FORMS (TorchScript: no global tuples)


def triton_runs_on_cuda() -> bool:
    """Whether the Triton forms can run here: a triton they are checked with, and a CUDA device."""
    return TRITON_INSTALLED and torch.cuda.is_available() and not triton_too_old()


def triton_in_auto() -> bool:
    """Whether 'auto' picks the Triton kernels on CUDA: TIMM_EPSANET_TRITON=1 and triton runs."""
    return TRITON_IN_AUTO and triton_runs_on_cuda()


def triton_attention_in_auto() -> bool:
    """Whether a PSA of 'auto' branches runs its attention on the Triton kernels on CUDA:
    TIMM_EPSANET_TRITON=1 or =attention, and triton runs."""
    return (TRITON_IN_AUTO or TRITON_ATTENTION_IN_AUTO) and triton_runs_on_cuda()


def calls_hooked(modules: Iterable[torch.nn.Module]) -> bool:
    """Whether a hook would see a call of any of `modules` (hooks on one, or on every module): the
    fused kernels, which compute several modules in one call, then leave them to their own calls
    (pruning's pre-hook sets a conv's weight, counters and summaries read each layer's output)."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks \
            or hooks._global_backward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def plain_eager(x: torch.Tensor) -> bool:
    """Whether x is a plain tensor (or parameter) with memory, in plain eager mode: not compiled,
    traced or exported, under no dispatch mode (fake tensors, op counters) or functorch transform,
    and not captured into a CUDA graph. There the backend may keep tensors across calls and skip
    the custom ops' dispatch layers; graphs being captured must see every op (and a tensor built
    during a CUDA graph's capture holds its values only once the graph replays)."""
    if type(x) not in (torch.Tensor, torch.nn.Parameter) or x.device.type == 'meta':
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    exporting = getattr(torch.compiler, 'is_exporting', None)
    if (exporting is not None and exporting()) or is_in_torch_dispatch_mode():
        return False
    return not torch._C._are_functorch_transforms_active()


def layout_of(x: torch.Tensor) -> str:
    """'nchw' or 'channels_last': the layout `x` is stored in (NCHW when it is both or neither)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return 'channels_last'
    return 'nchw'


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if layout == 'channels_last' else torch.contiguous_format)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs a conv in on `device_type`, or None where it is off. The meta device
    (on which a model is shaped and its FLOPs counted) has no autocast: torch would raise when
    asked. (Named, not asked of `torch.amp.is_autocast_available`: torch 2.8's compile breaks its
    graph there.)"""
    if device_type != 'meta' and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def computes_in_low_precision(x: torch.Tensor) -> bool:
    """Whether a CPU conv of `x` will run in a 16-bit float: autocast, or 16-bit input."""
    if x.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        return torch.get_autocast_dtype('cpu') != torch.float32
    return x.dtype != torch.float32
