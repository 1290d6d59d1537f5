""" The compute backend of PSA's branches: each branch conv in the form and memory layout that
is fastest where it runs, all branches concatenated.

Private to the package: `psa.PyramidSqueezeAttention` builds a `BranchConvs` of `BranchConv2d`s
and calls it; nothing else about the layer depends on how the branches are computed. Every form
has the grouped conv's weights and state dict, and computes its function up to float
summation order.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module

from ._branch_forms import (
    FastFormGroupedBackward, autocast_conv_inputs, block_diagonal_weight, fast_form_conv, group_sum_weight,
    regroup_factor, sums_groups_by_conv,
)
from ._branch_plans import (
    TRITON_FORMS, Plan, computes_in_low_precision, cpu_branch_plan, cuda_branch_form, in_layout, layout_of,
    triton_in_auto,
)
from ._branch_tuning import tuned_plans

# How a PSA branch's grouped conv is computed (`BranchConv2d`).
BRANCH_FORMS = ('auto', 'grouped', 'depthwise', 'volumetric', 'dense', 'regrouped', 'triton', 'triton_mma')


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

    def _apply(self, fn, recurse=True):
        """Keep the weight NCHW-contiguous through `model.to(memory_format=torch.channels_last)`.

        oneDNN runs a conv channels-last when its input or its weight is, so the branches planned
        NCHW would copy a channels-last weight back every forward; the other forms and
        channels-last inputs take an NCHW weight at no cost. CPU only: CUDA keeps what was measured.
        """
        super()._apply(fn, recurse)
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
        with or without autograd, in fp32 or a 16-bit float (`low_precision`). Layouts are only
        chosen on CPU; elsewhere the branch runs in the caller's layout ('any')."""
        if device_type == 'cpu':
            return self.cpu_plans[2 * int(grad_enabled) + int(low_precision)]
        if self.form.startswith('triton') and device_type != 'cuda':  # TRITON_FORMS (TorchScript: no global tuples)
            return 'grouped', 'any'
        if self.form != 'auto':
            return self.form, 'any'
        if device_type == 'cuda':
            # TorchScript runs the kernels' custom ops only where a form names them explicitly
            triton = False if torch.jit.is_scripting() else triton_in_auto()
            form = cuda_branch_form(
                self.groups, grad_enabled, in_per_group=self.in_channels // self.groups, triton=triton)
            return form, 'any'
        return 'grouped', 'any'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            weight = block_diagonal_weight(self.weight, self.groups, merge)
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups // merge)
        if form == 'grouped':  # NCHW inputs stay NCHW on CPU: the weight is kept NCHW (`_apply`)
            return self._conv_forward(x, self.weight, self.bias)
        if form == 'triton' or form == 'triton_mma':
            return self._triton_forward(x, form == 'triton_mma')
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
        from . import _triton_branch  # imported only where it runs: it needs triton
        x, weight = autocast_conv_inputs(x, self.weight)
        groups = self.groups
        if tensor_cores and self.mma_regroup > 1:
            weight = block_diagonal_weight(weight, groups, self.mma_regroup)
            groups //= self.mma_regroup
        return _triton_branch.branch_conv(x, weight, self.stride, self.padding, self.dilation, groups, tensor_cores)

    @torch.jit.unused
    def _train_forward(self, x: torch.Tensor, form: str) -> torch.Tensor:
        return FastFormGroupedBackward.apply(
            x, self.weight, self.group_sum_weight, form, self.stride, self.padding, self.dilation, self.groups)


def _autograd_plan() -> bool:
    """Whether to run the training plan. A TorchScript trace (`torch.jit.trace`, the TorchScript
    ONNX exporter) runs the inference plan in any grad mode: its forms are plain differentiable
    ops, so the traced graph is right with or without autograd, and it holds no autograd Function
    (which the trace would keep as an opaque Python op)."""
    return torch.is_grad_enabled() and not torch.jit.is_tracing()


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
        if isinstance(x, torch.fx.Proxy):
            # traced by an FX tracer that does not know timm's leaves (torchvision's feature
            # extraction, FX quantization): the grouped convs hold for every mode the graph runs in
            return torch.cat([conv.forward_as(x, 'grouped') for conv in self], dim=1)
        grad_enabled = _autograd_plan()
        plans = tuned_plans(self, x, grad_enabled)  # None unless branch tuning is on (`set_branch_tuning`)
        if plans is None:
            low_precision = x.device.type == 'cpu' and computes_in_low_precision(x)
            plans = [conv.plan_for(x.device.type, grad_enabled, low_precision) for conv in self]
        return self.run_plans(x, plans)

    @torch.jit.unused
    def run_plans(self, x: torch.Tensor, plans: List[Plan]) -> torch.Tensor:
        """The branches of `x`, branch i in form and layout `plans[i]`."""
        grad_enabled = _autograd_plan()
        caller = layout_of(x)
        flexible = 'channels_last' if any(layout == 'channels_last' for _, layout in plans) else caller
        inputs = {caller: x}
        feats = []
        for conv, (form, layout) in zip(self, plans):
            layout = flexible if layout == 'any' else layout
            if layout not in inputs:
                inputs[layout] = in_layout(x, layout)
            feats.append(conv.forward_as(inputs[layout], form))
        if grad_enabled or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return in_layout(torch.cat(feats, dim=1), caller)
        # write the concat straight into the caller's layout (a mixed-layout cat returns NCHW)
        B, _, H, W = feats[0].shape
        out = torch.empty(
            (B, sum(f.shape[1] for f in feats), H, W), dtype=feats[0].dtype, device=x.device,
            memory_format=torch.channels_last if caller == 'channels_last' else torch.contiguous_format)
        return torch.cat(feats, dim=1, out=out)
