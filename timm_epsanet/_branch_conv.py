""" The compute backend of PSA's branches: each branch conv in the form and memory layout that
is fastest where it runs, all branches concatenated.

Private to the package: `psa.PyramidSqueezeAttention` builds a `BranchConvs` of `BranchConv2d`s
and calls it; nothing else about the layer depends on how the branches are computed. Every form
has the grouped conv's weights and state dict, and computes its function up to float
summation order.
"""
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from ._branch_forms import (
    FastFormGroupedBackward, autocast_conv_inputs, block_diagonal_weight, block_mask, fast_form_conv,
    group_sum_weight, regroup_factor, sums_groups_by_conv,
)
from ._branch_plans import (
    TRITON_FORMS, Plan, autocast_dtype, calls_hooked, computes_in_low_precision, cpu_branch_plan, cuda_branch_form,
    in_layout, kernel_layout, layout_of, plain_eager, triton_in_auto,
)
from ._branch_tuning import tuned_plans

# How a PSA branch's grouped conv is computed (`BranchConv2d`).
BRANCH_FORMS = (
    'auto', 'grouped', 'depthwise', 'volumetric', 'dense', 'regrouped', 'triton', 'triton_mma', 'triton_spc')


class BranchConv2d(nn.Conv2d):
    """A PSA branch: a grouped conv, computed in the form that is fastest where it runs.

    Forms (`form`), all exact up to float summation order (see `_branch_forms`):
      * grouped: the plain grouped conv.
      * depthwise: depthwise convs and a group sum. Its backward is slower than the grouped
        conv's, so training pairs its forward with the grouped conv's backward.
      * volumetric: depthwise conv3ds over NCHW x viewed as a volume; trains like depthwise.
      * dense: a dense conv with the block-diagonal weight.
      * regrouped: adjacent groups merged into groups of 8 or more outputs (`regroup_factor`),
        each with a block-diagonal weight: between grouped (1x MACs) and dense (groups x).
      * triton: the Triton kernels of `_triton_branch` (forward and both gradients) on CUDA
        cores, on CUDA; on CPU the same plans as auto, on other devices the grouped conv.
      * triton_mma: the regrouped conv by `_triton_branch`'s tensor-core kernels: adjacent groups
        merged into groups of 16 or more outputs (`tl.dot`'s smallest tile), block-diagonal
        weights; CUDA only, elsewhere as triton.
      * triton_spc: triton_mma, and the PSA's branches in this form that read the same merged
        input slices computed together by `_triton_spc`'s kernels (`BranchConvs`): one read of
        each input tile for all of them. A branch alone is triton_mma.
      * auto: on CPU `cpu_branch_plan` (form and memory layout), on CUDA `cuda_branch_form`,
        elsewhere the grouped conv.
    The module computes in its input's layout; `BranchConvs` hands each branch the layout of its
    `plan_for`.
    """

    def __init__(self, *args, form: str = 'auto', **kwargs):
        super().__init__(*args, **kwargs)
        if form not in BRANCH_FORMS:
            raise ValueError(f'PSA branch_form must be one of {BRANCH_FORMS}, got {form!r}')
        in_per_group = self.in_channels // self.groups
        if self.groups == 1 or in_per_group == 1 or self.bias is not None:
            form = 'grouped'  # dense or depthwise already: nothing to reformulate
        self.form = form
        # groups merged by the regrouped form (1: it is the grouped conv)
        self.regroup: int = regroup_factor(self.groups, self.out_channels // self.groups)
        # groups merged by the triton_mma form
        self.mma_regroup: int = regroup_factor(self.groups, self.out_channels // self.groups, min_outs=16)
        shape = (self.kernel_size[0], in_per_group, self.out_channels // self.groups, self.groups, max(self.stride))
        # CPU plans at index 2 * training + low_precision
        self.cpu_plans: List[Plan] = [
            self._cpu_plan(shape, training, low) for training in (False, True) for low in (False, True)]
        # the depthwise form's group-sum weights: computed once, moved and cast with the module,
        # not part of the state dict (None where the form or the output width never uses them)
        uses_sum_conv = form in ('auto', 'depthwise') + TRITON_FORMS and sums_groups_by_conv(self.out_channels)
        self.register_buffer('group_sum_weight', self._group_sum_weight() if uses_sum_conv else None, persistent=False)
        # tensors derived from the weight, kept for inference (`kept_weight`): key -> (the weight they
        # were built from, its version, the tensor)
        self._kept: Dict[Tuple[str, int, torch.dtype], Tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __getstate__(self):
        state = super().__getstate__()
        state['_kept'] = {}  # derived from the weight: never copied or saved
        return state

    def train(self, mode: bool = True):
        """Also forget what was kept for inference: writes through `weight.data` bypass the
        version counter that `kept_weight` checks (as they bypass autograd's own checks), and a
        loop that changes weights that way still switches modes between training and evaluating."""
        self._kept = {}
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        """Keep the weight NCHW-contiguous through `model.to(memory_format=torch.channels_last)`.

        oneDNN runs a conv channels-last when its input or its weight is, so the branches planned
        NCHW would copy a channels-last weight back every forward; the other forms and
        channels-last inputs take an NCHW weight at no cost. CPU only: CUDA keeps what was measured.
        """
        super()._apply(fn, recurse)
        self._kept = {}  # built from the weight as it was
        if self.weight.device.type == 'cpu' and not self.weight.is_contiguous():
            self.weight.data = self.weight.data.contiguous()
        return self

    def _group_sum_weight(self) -> torch.Tensor:
        return group_sum_weight(
            self.in_channels, self.groups, self.out_channels // self.groups, self.weight.device, self.weight.dtype)

    def init_non_persistent_buffers(self) -> None:
        """Recompute `group_sum_weight` (timm's hook, e.g. after `to_empty()` of a meta-device model)."""
        if self.group_sum_weight is not None:
            with torch.no_grad():
                self.group_sum_weight.copy_(self._group_sum_weight())

    def _cpu_plan(self, shape: Tuple[int, int, int, int, int], training: bool, low_precision: bool) -> Plan:
        if self.form == 'auto' or self.form in TRITON_FORMS:  # the kernels run on CUDA only
            return cpu_branch_plan(*shape, training=training, low_precision=low_precision)
        if self.groups == 1 and not low_precision:
            return 'grouped', 'any'  # a dense conv is as fast in either layout
        if self.form == 'volumetric':
            return self.form, 'nchw'  # its input is viewed as a volume: NCHW without a copy
        return self.form, 'channels_last'  # any other form: channels-last, fastest for grouped convs

    def plan_for(self, device_type: str, grad_enabled: bool, low_precision: bool = False) -> Plan:
        """(form, memory layout) of this branch on a device of `device_type` ('cpu', 'cuda', ...),
        with or without autograd, in fp32 or a 16-bit float (`low_precision`). Layouts are chosen
        on CPU; elsewhere the Triton kernels run in channels-last (`kernel_layout`) and the other
        forms in the caller's layout ('any')."""
        if device_type == 'cpu':
            return self.cpu_plans[2 * int(grad_enabled) + int(low_precision)]
        if self.form.startswith('triton') and device_type != 'cuda':  # TRITON_FORMS (TorchScript: no global tuples)
            return 'grouped', 'any'
        if self.form != 'auto':
            return self.form, kernel_layout(self.form)
        if device_type == 'cuda':
            # TorchScript runs the kernels' custom ops only where a form names them explicitly
            triton = False if torch.jit.is_scripting() else triton_in_auto()
            form = cuda_branch_form(
                self.groups, grad_enabled, in_per_group=self.in_channels // self.groups, triton=triton,
                out_channels=self.out_channels, stride=self.stride[0])
            return form, kernel_layout(form)
        return 'grouped', 'any'

    def forward(self, x: torch.Tensor, form: Optional[str] = None) -> torch.Tensor:
        """The branch of x, in `form` where given (`BranchConvs` passes its plan's, so that the
        branch is called as a module: hooks on it run, as on any conv), else in its plan's."""
        if form is not None:
            return self.forward_as(x, form)
        form = self.form
        if form == 'auto' or (form.startswith('triton') and x.device.type != 'cuda'):  # the kernels need CUDA
            if torch.jit.is_scripting():
                low_precision = x.dtype != torch.float32
            else:
                low_precision = computes_in_low_precision(x)
            form = self.plan_for(x.device.type, _autograd_plan(), low_precision)[0]
        return self.forward_as(x, form)

    def forward_as(self, x: torch.Tensor, form: str) -> torch.Tensor:
        """The branch computed in `form`, in `x`'s memory layout."""
        if form == 'dense' or form == 'regrouped':
            merge = self.groups if form == 'dense' else self.regroup
            if merge == 1:
                return self._conv_forward(x, self.weight, self.bias)
            if torch.jit.is_scripting():
                weight = block_diagonal_weight(self.weight, self.groups, merge)
            else:  # cast as autocast would cast it: kept for inference
                weight = self.merged_weight(merge, _autocast_dtype(x, self.weight.dtype))
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups // merge)
        if form == 'grouped':  # NCHW inputs stay NCHW on CPU: the weight is kept NCHW (`_apply`)
            return self._conv_forward(x, self.weight, self.bias)
        if form == 'triton' or form == 'triton_mma' or form == 'triton_spc':
            return self._triton_forward(x, form != 'triton')
        if not _autograd_plan():
            y = fast_form_conv(
                x, self.weight, form, self.stride, self.padding, self.dilation, self.groups, self.group_sum_weight)
        elif torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        else:
            y = self._train_forward(x, form)
        return in_layout(y, layout_of(x)) if form == 'volumetric' else y  # volumetric computes NCHW

    @torch.jit.unused
    def _triton_forward(self, x: torch.Tensor, tensor_cores: bool) -> torch.Tensor:
        if tensor_cores and self.is_same_conv():
            return _tensor_core_branches(x, [self])  # as fused branches are run (in eager mode: no custom op)
        from . import _triton_branch  # imported only where it runs: it needs triton
        if tensor_cores:
            x, weight, groups = self.mma_inputs(x)
        else:
            (x, weight), groups = autocast_conv_inputs(x, self.weight), self.groups
        return _triton_branch.branch_conv(x, weight, self.stride, self.padding, self.dilation, groups, tensor_cores)

    @torch.jit.unused
    def mma_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """x and the weight as the tensor-core kernels take them: cast as autocast casts a conv's,
        adjacent groups merged into groups of 16 or more outputs (`mma_regroup`); and the merged
        group count."""
        if self.mma_regroup == 1:
            x, weight = autocast_conv_inputs(x, self.weight)
            return x, weight, self.groups
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:  # as autocast_conv_inputs, the weight cast by merged_weight
            x = x.to(dtype)
        return x, self.merged_weight(self.mma_regroup, _autocast_dtype(x, self.weight.dtype)), \
            self.groups // self.mma_regroup

    @torch.jit.unused
    def merged_weight(self, merge: int, dtype: torch.dtype) -> torch.Tensor:
        """The weight with `merge` adjacent groups merged (`block_diagonal_weight`), in `dtype`
        (`kept_weight`: built once for inference; in training with a kept mask, `_kept_block_mask`)."""
        def build(weight: torch.Tensor) -> torch.Tensor:
            weight = weight.to(dtype)
            mask = _kept_block_mask(merge, dtype, weight.device) if plain_eager(weight) else None
            return block_diagonal_weight(weight, self.groups, merge, mask)

        return self.kept_weight(('merged', merge, dtype), build)

    @torch.jit.unused
    def kept_weight(self, key: Tuple[str, int, torch.dtype], build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`build(self.weight)`: a tensor derived from the weight (merged, cast, laid out for a kernel).

        With autograd, or in train mode, it is built anew in every forward (with autograd as part of
        the graph). In eval mode without autograd (inference) it is kept under `key` and reused until
        the weight changes: updated in place (its version), replaced, moved or cast, or the module
        put in train or eval mode. A model in eval mode then builds it once instead of per forward:
        the build's small ops cost more host time than the branch's kernel at batch sizes a GPU
        runs. An in-place write through `weight.data` is the one change the version does not
        record: `train()`/`eval()` after it rebuilds. Train mode never keeps, for the no-grad
        forwards that follow such writes step after step (momentum encoders, whose updates
        through `.data` would otherwise leave them on their first weights).
        """
        weight = self.weight
        if self.training or not _may_keep(weight):
            return build(weight)
        kept = self._kept.get(key)
        # the kept source holds the weight's memory, so a new weight cannot take its address
        if kept is not None and kept[0].data_ptr() == weight.data_ptr() and kept[1] == weight._version:
            source = kept[0]
            if source.dtype == weight.dtype and source.device == weight.device and source.shape == weight.shape:
                return kept[2]
        made = build(weight.detach())
        self._kept[key] = (weight.detach(), weight._version, made)
        return made

    def is_same_conv(self) -> bool:
        """Whether the kernel is square and odd, and padded to keep its centre (as PSA's branches are)."""
        k_h, k_w = self.kernel_size
        return k_h == k_w and k_h % 2 == 1 and tuple(self.padding) == tuple(d * (k_h // 2) for d in self.dilation)

    def spc_key(self) -> Tuple[int, int, int, List[int], List[int]]:
        """What branches computed together by `_triton_spc` share, besides their input: merged groups,
        input and output channels per merged group, stride and dilation."""
        groups = self.groups // self.mma_regroup
        return (groups, self.in_channels // groups, self.out_channels // groups, list(self.stride), list(self.dilation))

    @torch.jit.unused
    def _train_forward(self, x: torch.Tensor, form: str) -> torch.Tensor:
        return FastFormGroupedBackward.apply(
            x, self.weight, self.group_sum_weight, form, self.stride, self.padding, self.dilation, self.groups)


def _may_keep(weight: torch.Tensor) -> bool:
    """Whether `BranchConv2d.kept_weight` may keep what it builds: eager inference on a plain
    weight (`plain_eager`: traces, compiles and exports must hold the build in their graphs, and
    fake and functional tensors have no memory to key by)."""
    return not torch.is_grad_enabled() and plain_eager(weight)


@functools.lru_cache(maxsize=None)
def _kept_block_mask(merge: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`block_mask`, built once per merge, dtype and device: a training step builds every dense or
    regrouped branch's weight anew, and the mask's own ops (kernel launches on a GPU) would come
    with each. A normal tensor even when first asked for under `torch.inference_mode`, so that
    training may save it for backward."""
    with torch.inference_mode(False):
        return block_mask(merge, dtype, device)


def _autocast_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast casts a conv's weight to on x's device, else `dtype`."""
    autocast = autocast_dtype(x.device.type)
    return dtype if autocast is None else autocast


def _autograd_plan() -> bool:
    """Whether to run the training plan. A TorchScript trace (`torch.jit.trace`, the TorchScript
    ONNX exporter) runs the inference plan in any grad mode: its forms are plain differentiable
    ops, so the traced graph is right with or without autograd, and it holds no autograd Function
    (which the trace would keep as an opaque Python op)."""
    return torch.is_grad_enabled() and not torch.jit.is_tracing()


def _tensor_core_branches(x: torch.Tensor, convs: List[BranchConv2d]) -> torch.Tensor:
    """Branches `convs` of x on the tensor-core kernels by `_triton_spc.spc_conv_grouped`, concatenated:
    a fused run (`BranchConvs.spc_runs`) or one "same" conv alone. The input cast as autocast casts a
    conv's; without autograd, each branch's weight tiles built once (`BranchConv2d.kept_weight`)."""
    from . import _triton_spc  # imported only where it runs: it needs triton
    first = convs[0]
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x = x.to(dtype)
    elif any(conv.weight.dtype != x.dtype for conv in convs):  # as a conv refuses them
        raise RuntimeError(f'PSA branches: the input is {x.dtype} but the weights are {first.weight.dtype}; '
                           f'cast the model or run under autocast')
    merges = [conv.mma_regroup for conv in convs]
    merged = first.groups // first.mma_regroup
    tiles = None
    if not _autograd_plan() and plain_eager(x):
        tiles = [conv.kept_weight(('spc', m, x.dtype), lambda w, m=m: _triton_spc.branch_tiles(
            [w], [m], merged, x.dtype, transposed=False)[0]) for conv, m in zip(convs, merges)]
    return _triton_spc.spc_conv_grouped(
        x, [conv.weight for conv in convs], merges, merged, first.stride, first.dilation, tiles)


@register_notrace_module  # an FX leaf: its plan is chosen per call, when the traced graph runs
class BranchConvs(nn.ModuleList):
    """PSA's branch convs (`BranchConv2d`), each applied to the whole input; returns their
    outputs concatenated along channels, in the input's memory layout.

    Each branch runs in the form and layout of its plan, and the input is converted at most once
    per layout, so branches planned in different layouts share the converts.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.cat([conv(x) for conv in self], dim=1)
        return self._planned(x)

    @torch.jit.unused
    def _planned(self, x: torch.Tensor) -> torch.Tensor:
        if not all(isinstance(conv, BranchConv2d) for conv in self):
            # a branch replaced by another module (an adapter such as peft's LoRA wraps the conv in
            # its own module): every branch computes itself, in the caller's layout
            return torch.cat([conv(x) for conv in self], dim=1)
        if isinstance(x, torch.fx.Proxy) or torch._C._are_functorch_transforms_active():
            # traced by an FX tracer that does not know timm's leaves (torchvision's feature
            # extraction, FX quantization): the grouped convs hold for every mode the graph runs in.
            # Under torch.func's transforms (vmap for per-sample gradients or stacked ensembles), which
            # cannot tell a batched tensor's memory layout, the grouped conv is the form they batch.
            return torch.cat([conv(x, 'grouped') for conv in self], dim=1)
        grad_enabled = _autograd_plan()
        plans = tuned_plans(self, x, grad_enabled)  # None unless branch tuning is on (`set_branch_tuning`)
        if plans is None:
            low_precision = x.device.type == 'cpu' and computes_in_low_precision(x)
            plans = [conv.plan_for(x.device.type, grad_enabled, low_precision) for conv in self]
        return self.run_plans(x, plans)

    @torch.jit.unused
    def spc_runs(self, plans: List[Plan], layouts: List[str]) -> List[List[int]]:
        """The branches planned 'triton_spc' that `_triton_spc` computes together, as lists of
        branch indices in ascending kernel size: those that read the same input (layout) with the
        same `spc_key`, 2 to 4 per run. A dense branch (one group, planned 'grouped') that reads
        the same slices joins them (Small's kernel-3 branch at stage 1): its taps are the centre's,
        whose input tiles the others read anyway. Kept per plan: every eager call asks, and the
        answer depends only on the plan and the branches' shapes (under torch.compile, found anew:
        a graph holds no such state)."""
        if all(form != 'triton_spc' for form, _ in plans) or calls_hooked(self):
            return []  # a hooked branch is called alone, as a module
        if torch.compiler.is_compiling():
            return self._find_spc_runs(plans, layouts)
        kept = self.__dict__.setdefault('_spc_runs_kept', {})  # not a module attribute: not in state_dict
        key = (tuple(map(tuple, plans)), tuple(layouts))
        if key not in kept:
            kept[key] = tuple(tuple(run) for run in self._find_spc_runs(plans, layouts))
        return [list(run) for run in kept[key]]

    @torch.jit.unused
    def _find_spc_runs(self, plans: List[Plan], layouts: List[str]) -> List[List[int]]:
        by_key: Dict[str, List[int]] = {}
        fused_keys = set()
        for i, (conv, (form, _), layout) in enumerate(zip(self, plans, layouts)):
            dense = form == 'grouped' and conv.groups == 1 and conv.bias is None
            if form == 'triton_spc' or dense:
                key = repr((layout, conv.spc_key()))
                by_key.setdefault(key, []).append(i)
                if form == 'triton_spc':
                    fused_keys.add(key)
        if not any(len(members) > 1 for key, members in by_key.items() if key in fused_keys):
            return []
        from ._triton_spc import MAX_BRANCHES, fusable  # triton_spc runs the kernels: triton is there
        runs = []
        for key, members in by_key.items():
            if key not in fused_keys:
                continue  # dense branches alone: the backend's dense conv
            members = sorted(members, key=lambda i: self[i].kernel_size[0])
            for run in (members[j:j + MAX_BRANCHES] for j in range(0, len(members), MAX_BRANCHES)):
                convs = [self[i] for i in run]
                if len(run) > 1 and fusable(
                        convs[0].in_channels, [c.out_channels for c in convs], [c.kernel_size[0] for c in convs],
                        [c.spc_key()[0] for c in convs], [c.stride for c in convs], [c.padding for c in convs],
                        [c.dilation for c in convs]) and all(c.kernel_size[0] == c.kernel_size[1] for c in convs):
                    runs.append(run)
        return runs

    @torch.jit.unused
    def _spc_forward(self, x: torch.Tensor, members: List[int]) -> torch.Tensor:
        """The branches `members` (a run of `spc_runs`) of x by `_triton_spc`, concatenated."""
        return _tensor_core_branches(x, [self[i] for i in members])

    @torch.jit.unused
    def run_plans(self, x: torch.Tensor, plans: List[Plan], as_modules: bool = True) -> torch.Tensor:
        """The branches of `x`, branch i in form and layout `plans[i]`: each called as a module, so
        that its hooks run, or with `as_modules=False` past them (branch tuning's trial runs, which
        no hook should see, as none sees cuDNN's benchmark trials)."""
        grad_enabled = _autograd_plan()
        caller = layout_of(x)
        flexible = 'channels_last' if any(layout == 'channels_last' for _, layout in plans) else caller
        layouts = [flexible if layout == 'any' else layout for _, layout in plans]
        inputs = {caller: x}
        for layout in layouts:
            if layout not in inputs:
                inputs[layout] = in_layout(x, layout)
        feats: List[Optional[torch.Tensor]] = [None] * len(plans)
        for members in self.spc_runs(plans, layouts):
            y = self._spc_forward(inputs[layouts[members[0]]], members)
            if members == list(range(len(self))):  # every branch, in order: y is the concat
                return in_layout(y, caller)
            for i, y_i in zip(members, y.split([self[i].out_channels for i in members], dim=1)):
                feats[i] = y_i
        for i, (conv, (form, _), layout) in enumerate(zip(self, plans, layouts)):
            if feats[i] is None:
                feats[i] = conv(inputs[layout], form) if as_modules else conv.forward_as(inputs[layout], form)
        if grad_enabled or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return in_layout(torch.cat(feats, dim=1), caller)
        # write the concat straight into the caller's layout (a mixed-layout cat returns NCHW)
        B, _, H, W = feats[0].shape
        out = torch.empty(
            (B, sum(f.shape[1] for f in feats), H, W), dtype=feats[0].dtype, device=x.device,
            memory_format=torch.channels_last if caller == 'channels_last' else torch.contiguous_format)
        return torch.cat(feats, dim=1, out=out)
