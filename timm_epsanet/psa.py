""" Pyramid Squeeze Attention (PSA), the layer at the heart of EPSANet.

Paper: `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447 (Zhang et al., ACCV 2022)

PSA = SPC (S parallel convolutions with growing kernel and group sizes, each seeing the whole
input and producing C/S channels) + one SEWeight module shared by all S branches + a softmax
across the S scales + channel-wise reweighting + concatenation (paper eqs. 3-11).

Branches are concatenated in paper order (branch 0 first). The official code concatenates them
reversed; converting its weights is a permutation of the channels that follow PSA.
"""
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import SEModule, get_act_layer, get_padding

__all__ = [
    'BRANCH_FORMS', 'BranchConv2d', 'PyramidSqueezeAttention', 'SEWeight', 'block_diagonal_weight',
    'cpu_branch_plan', 'default_groups', 'default_kernel_sizes', 'depthwise_form_conv', 'group_sum_weight',
    'volumetric_form_conv',
]

# How a PSA branch's grouped conv is computed; every form gives the same function and state dict.
BRANCH_FORMS = ('auto', 'grouped', 'depthwise', 'volumetric', 'dense')


def default_kernel_sizes(num_scales: int) -> Tuple[int, ...]:
    """Kernel of branch i is 2(i+1)+1 (paper, after eq. 4): (3, 5, 7, 9) for S=4."""
    return tuple(2 * (i + 1) + 1 for i in range(num_scales))


def default_groups(kernel_sizes: Sequence[int]) -> Tuple[int, ...]:
    """Group rule of paper eq. 3: G = 2^((K-1)/2) for K > 3, G = 1 for K = 3."""
    return tuple(1 if k <= 3 else 2 ** ((k - 1) // 2) for k in kernel_sizes)


class SEWeight(SEModule):
    """The paper's SEWeight (Fig. 1): timm's SE module returning the sigmoid gate, not x * gate.

    PSA softmaxes the gates of all scales against each other before applying them, so the gate
    itself is the output.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        return self.gate(x_se)


def cpu_branch_plan(
        kernel_size: int,
        in_per_group: int,
        outs_per_group: int,
        groups: int = 1,
        stride: int = 1,
        training: bool = False,
        low_precision: bool = False,
) -> Tuple[str, str]:
    """(form, memory layout) in which a PSA branch conv runs fastest on CPU.

    Layouts: 'nchw', 'channels_last', or 'any': channels-last when the PSA has a channels-last
    copy of its input anyway, else NCHW. Measured with oneDNN, 2 threads, batch 8, per branch
    shape of EPSANet (benchmarks/psa_branches.py, saved in benchmarks/results/psa_branches_cpu*.json)
    and per whole PSA module (benchmarks/psa_plans.py, the choices that interact through layouts):
      * with few outputs per group (1-2, or up to 4 for kernels of 5 and more) the depthwise form,
        channels-last, wins: up to 6x for the 9x9 branch of stage 1.
      * at inference, with 16 or more groups (a full AVX-512 vector of fp32 channels) and 2-4
        outputs per group, the volumetric form beats it by 10-30% where the PSA has an NCHW copy
        of its input anyway (stages 2-3, stride 1; at stride 2 it measured slower).
      * oneDNN's grouped convs with 32 or more inputs per group and kernels of 5 and more run up
        to 1.7x faster in NCHW than channels-last at inference (the convert is paid once per PSA);
        in training NCHW wins by less, and only without the convert, so they keep the caller's.
        At stride 2 the same holds from 16 inputs per group with at most 16 groups.
      * other grouped convs run faster channels-last (1.5-3x in NCHW's disfavour for few inputs
        per group); the dense branch is as fast in either.
    bf16 (`low_precision`, e.g. CPU autocast): oneDNN's bf16 depthwise convs are slower, so the
    depthwise form only for kernels of 5 and more with 1-2 outputs per group, else channels-last.
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


def layout_of(x: torch.Tensor) -> str:
    """'nchw' or 'channels_last': the layout `x` is stored in (NCHW when it is both or neither)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return 'channels_last'
    return 'nchw'


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if layout == 'channels_last' else torch.contiguous_format)


def computes_in_low_precision(x: torch.Tensor) -> bool:
    """Whether a CPU conv of `x` will run in a 16-bit float: autocast, or 16-bit input."""
    if x.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        return torch.get_autocast_dtype('cpu') != torch.float32
    return x.dtype != torch.float32


def sums_groups_by_conv(out_chs: int) -> bool:
    """Whether the depthwise form sums its groups with a 1x1 conv (`depthwise_form_conv`)."""
    return out_chs <= 16


def depthwise_form_conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
        sum_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`F.conv2d(x, weight, None, stride, padding, dilation, groups)` computed as depthwise convs.

    Output r of group j is the sum over the group's input channels i of w[j, r, i] * x[i]: one
    depthwise conv of x with the weights w[:, r] followed by a sum over each group's channels.
    Same conv MACs, exact up to float summation order. The output keeps x's memory layout.

    The group sum is a reduction over channels, innermost in channels-last memory, where torch's
    reductions are slow: for narrow outputs (<= 16 channels, stage 1 of EPSANet Small) it runs as
    a 1x1 conv with 0/1 weights instead (2-3x faster there; it costs out_chs MACs per input read).
    `sum_weight`: those weights (`group_sum_weight`), built here when not given.
    """
    in_chs = x.shape[1]
    out_chs, in_per_group, k_h, k_w = weight.shape
    outs = out_chs // groups
    # depthwise weights of output r: input channel c = j * in_per_group + i gets w[j * outs + r, i]
    dw_weight = weight.reshape(groups, outs, in_per_group, k_h, k_w).transpose(0, 1).reshape(outs, in_chs, 1, k_h, k_w)
    if sums_groups_by_conv(out_chs):
        if sum_weight is None:
            sum_weight = group_sum_weight(in_chs, groups, outs, x.device, x.dtype)
        sum_weight = sum_weight.to(x.dtype)  # a no-op unless a caller cast x (autocast in training)
        y = F.conv2d(F.conv2d(x, dw_weight[0], None, stride, padding, dilation, in_chs), sum_weight[:out_chs])
        for r in range(1, outs):
            y.add_(F.conv2d(F.conv2d(x, dw_weight[r], None, stride, padding, dilation, in_chs),
                            sum_weight[r * out_chs:(r + 1) * out_chs]))
        return y
    channels_last = layout_of(x) == 'channels_last'
    ys: List[torch.Tensor] = []
    for r in range(outs):
        y = F.conv2d(x, dw_weight[r], None, stride, padding, dilation, in_chs)
        B, _, H, W = y.shape
        if channels_last:
            ys.append(y.permute(0, 2, 3, 1).reshape(B, H, W, groups, in_per_group).sum(-1))
        else:
            ys.append(y.reshape(B, groups, in_per_group, H, W).sum(2))
    if channels_last:
        y = ys[0] if outs == 1 else torch.stack(ys, dim=-1).flatten(3)
        return y.permute(0, 3, 1, 2)
    return ys[0] if outs == 1 else torch.stack(ys, dim=2).flatten(1, 2)


def group_sum_weight(
        in_chs: int,
        groups: int,
        outs: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """(outs * out_chs, in_chs, 1, 1) 0/1 weights, out_chs = groups * outs: rows r * out_chs to
    (r + 1) * out_chs map input channel j * in_per_group + i to output j * outs + r, so that 1x1
    conv sums each group's channels into its r-th output."""
    in_per_group = in_chs // groups
    c = torch.arange(in_chs, device=device)
    r = torch.arange(outs, device=device).unsqueeze(1)
    weight = torch.zeros(outs, groups * outs, in_chs, dtype=dtype, device=device)
    weight[r, torch.div(c, in_per_group, rounding_mode='floor') * outs + r, c] = 1.0
    return weight.reshape(outs * groups * outs, in_chs, 1, 1)


def volumetric_form_conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
) -> torch.Tensor:
    """`F.conv2d(x, weight, None, stride, padding, dilation, groups)` computed as depthwise conv3ds.

    Viewed as a volume (N, groups, in_per_group, H, W), NCHW x holds each group as one channel
    whose depth is the group's input channels; output r of every group is then a depthwise
    conv3d with kernel depth in_per_group and no depth padding (output depth 1). Same MACs as
    the grouped conv, no intermediate the size of x (unlike the depthwise form), one conv3d per
    output of a group. Exact up to float summation order; returns NCHW.
    """
    B, in_chs, H, W = x.shape
    out_chs, in_per_group, k_h, k_w = weight.shape
    outs = out_chs // groups
    volume = x.contiguous().view(B, groups, in_per_group, H, W)
    # weights of output r of every group: (groups, 1, in_per_group, k_h, k_w)
    weights = weight.reshape(groups, outs, 1, in_per_group, k_h, k_w).transpose(0, 1).contiguous()
    ys = [F.conv3d(volume, weights[r], None, (1, stride[0], stride[1]), (0, padding[0], padding[1]),
                   (1, dilation[0], dilation[1]), groups) for r in range(outs)]
    y = ys[0] if outs == 1 else torch.cat(ys, dim=2)  # (B, groups, outs, H_out, W_out)
    return y.flatten(1, 2)


class _FastFormGroupedBackward(torch.autograd.Function):
    """Training: the depthwise or volumetric form's fast forward, the grouped conv's (faster)
    backward, its weight gradient through FFTs where `fft_weight_grad_pays_off`."""

    @staticmethod
    def forward(ctx, x, weight, conv, form):
        # autocast does not reach into backward: cast as autocast would cast a conv, and save
        # those, so that the backward conv sees one dtype (CUDA refuses fp16 input, fp32 weight)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            out = conv.fast_form(x, weight, form)
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        fft_grad_w = ctx.needs_input_grad[1] and fft_weight_grad_pays_off(x, weight, stride, dilation)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not fft_grad_w, False])
        if fft_grad_w:
            grad_w = fft_weight_grad(x, grad_out, weight.shape[-2:], padding, groups)
        return grad_x, grad_w, None, None


def fft_weight_grad_pays_off(x: torch.Tensor, weight: torch.Tensor, stride, dilation) -> bool:
    """Whether `fft_weight_grad` beats oneDNN's weight gradient of a depthwise-form branch (1-4
    outputs per group): CPU, fp32, stride and dilation 1, kernels of 7 and more on inputs of 28x28
    and more (2 threads, batch 8, channels-last; EPSANet Small: stage 1's 9x9 18.3 -> 6.7 ms and
    7x7 11.7 -> 6.6 ms, stage 2's 9x9 8.6 -> 3.5 ms and 7x7 5.6 -> 4.9 ms; slower for 5x5 and on
    stage 3's 14x14)."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and min(weight.shape[-2:]) >= 7 and min(x.shape[-2:]) >= 28)


def fft_weight_grad(
        x: torch.Tensor,
        grad_out: torch.Tensor,
        kernel_size: Sequence[int],
        padding: Sequence[int],
        groups: int,
) -> torch.Tensor:
    """Weight gradient of a stride-1 grouped conv: the cross-correlation of each input channel
    with the output gradients of its group, summed over the batch, as products of 2D FFTs.

    oneDNN computes it directly at a few GMAC/s for large kernels with few channels per group;
    in the frequency domain it is one elementwise product per (group, output, input) pair.
    Float error ~1e-6 of the largest gradient (cuDNN offers FFT algorithms for the same reason).

    The conv's zero padding is not materialized: x is transformed zero-extended at its end, and the
    kernel tap (a, b) is the circular correlation at lag (a - p_h, b - p_w), negative lags wrapping
    to the end of a period long enough (>= H + p_h) that they only meet the zeros.
    """
    B, C, H, W = x.shape
    out_chs, H_out, W_out = grad_out.shape[1:]
    in_per_group, outs = C // groups, out_chs // groups
    (k_h, k_w), (p_h, p_w) = kernel_size, padding
    size = (_fft_size(max(H + p_h, H_out, k_h)), _fft_size(max(W + p_w, W_out, k_w)))
    x_f = torch.fft.rfft2(x, s=size).reshape(B, groups, 1, in_per_group, size[0], -1)
    g_f = torch.fft.rfft2(grad_out, s=size).conj().reshape(B, groups, outs, 1, size[0], -1)
    corr = torch.fft.irfft2((x_f * g_f).sum(0), s=size)
    corr = torch.roll(corr, (p_h, p_w), (-2, -1))[..., :k_h, :k_w]
    return corr.reshape(out_chs, in_per_group, k_h, k_w).contiguous()


def _fft_size(n: int) -> int:
    """The smallest length >= n with no prime factor above 5, where FFTs are fastest."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def block_diagonal_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight of the dense conv equal to a grouped conv: each group's block, zeros elsewhere.

    Differentiable, so training the dense form trains the grouped weight.
    """
    out_chs, in_per_group, k_h, k_w = weight.shape
    w = weight.reshape(groups, out_chs // groups, 1, in_per_group, k_h, k_w)
    mask = torch.eye(groups, dtype=weight.dtype, device=weight.device).reshape(groups, 1, groups, 1, 1, 1)
    return (w * mask).reshape(out_chs, groups * in_per_group, k_h, k_w)


class BranchConv2d(nn.Conv2d):
    """A PSA branch: a grouped conv, computed in the form that is fastest where it runs.

    Forms (`form`), all exact up to float summation order, all with the grouped conv's weights
    and state dict:
      * grouped: the plain grouped conv.
      * depthwise: `depthwise_form_conv`. CPU backends run it up to 6x faster than a grouped conv
        with 1-4 outputs per group (the large-kernel branches of the first stages, where the
        official code spends most of its time), but not its backward, so training uses the
        grouped conv's backward.
      * volumetric: `volumetric_form_conv`, depthwise conv3ds over NCHW x viewed as a volume:
        faster than the depthwise form at inference where 16 or more groups fill a SIMD vector
        and there are 2-4 outputs per group; trains like the depthwise form.
      * dense: a dense conv with `block_diagonal_weight`: `groups` times the MACs, but on one
        of the backends' best-tuned kernels.
      * auto: the form measured fastest (benchmarks/results): on CPU `cpu_branch_plan`, which
        also names the memory layout the branch runs fastest in; on CUDA the dense form for
        inference when groups <= 16 (H200, EPSANet-50 Small, fp16 channels-last: 5542 img/s
        against 4467 grouped), the grouped conv in training (1589 img/s against 1506 dense);
        elsewhere the grouped conv.
    The module computes in its input's layout; `PyramidSqueezeAttention` hands each branch the
    layout of its `plan_for`.
    """

    def __init__(self, *args, form: str = 'auto', **kwargs):
        super().__init__(*args, **kwargs)
        if form not in BRANCH_FORMS:
            raise ValueError(f'BranchConv2d form must be one of {BRANCH_FORMS}, got {form!r}')
        in_per_group = self.in_channels // self.groups
        if self.groups == 1 or in_per_group == 1 or self.bias is not None:
            form = 'grouped'  # dense or depthwise already: nothing to reformulate
        self.form = form
        shape = (self.kernel_size[0], in_per_group, self.out_channels // self.groups, self.groups, max(self.stride))
        # CPU plans at index 2 * training + low_precision
        self.cpu_plans: List[Tuple[str, str]] = [
            self._cpu_plan(shape, training, low) for training in (False, True) for low in (False, True)]
        # the depthwise form's group-sum weights: computed once, moved and cast with the module,
        # not part of the state dict (None where the form or the output width never uses them)
        uses_sum_conv = form in ('auto', 'depthwise') and sums_groups_by_conv(self.out_channels)
        self.register_buffer('group_sum_weight', self._group_sum_weight() if uses_sum_conv else None, persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep the weight NCHW-contiguous through `model.to(memory_format=torch.channels_last)`.

        oneDNN runs a conv channels-last when its input or its weight is, so the branches that run
        NCHW (`cpu_branch_plan`) would copy a channels-last weight back every forward (3.3 ms per
        batch for EPSANet-50 Small's 19 MB of them on this project's CPU); the other forms and
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

    def _cpu_plan(self, shape: Tuple[int, int, int, int, int], training: bool, low_precision: bool) -> Tuple[str, str]:
        if self.form == 'auto':
            return cpu_branch_plan(*shape, training=training, low_precision=low_precision)
        if self.groups == 1 and not low_precision:
            return 'grouped', 'any'  # a dense conv is as fast in either layout
        if self.form == 'volumetric':
            return self.form, 'nchw'  # its input is viewed as a volume: NCHW without a copy
        return self.form, 'channels_last'  # any other form: channels-last, fastest for grouped convs

    def plan_for(self, device_type: str, grad_enabled: bool, low_precision: bool = False) -> Tuple[str, str]:
        """(form, memory layout) of this branch on a device of `device_type` ('cpu', 'cuda', ...),
        with or without autograd, in fp32 or a 16-bit float (`low_precision`). Layouts are only
        chosen on CPU; elsewhere the branch runs in the caller's layout ('any')."""
        if device_type == 'cpu':
            return self.cpu_plans[2 * int(grad_enabled) + int(low_precision)]
        if self.form != 'auto':
            return self.form, 'any'
        if device_type == 'cuda' and not grad_enabled and self.groups <= 16:
            return 'dense', 'any'
        return 'grouped', 'any'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = self.form
        if form == 'auto':
            if torch.jit.is_scripting():
                low_precision = x.dtype != torch.float32
            else:
                low_precision = computes_in_low_precision(x)
            form = self.plan_for(x.device.type, torch.is_grad_enabled(), low_precision)[0]
        return self.forward_as(x, form)

    def forward_as(self, x: torch.Tensor, form: str) -> torch.Tensor:
        """The branch computed in `form`, in `x`'s memory layout."""
        if form == 'dense':
            weight = block_diagonal_weight(self.weight, self.groups)
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, 1)
        if form == 'grouped':  # NCHW inputs stay NCHW on CPU: the weight is kept NCHW (`_apply`)
            return self._conv_forward(x, self.weight, self.bias)
        if not torch.is_grad_enabled():
            y = self.fast_form(x, self.weight, form)
        elif torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        else:
            y = self._train_forward(x, form)
        return in_layout(y, layout_of(x)) if form == 'volumetric' else y  # volumetric computes NCHW

    def fast_form(self, x: torch.Tensor, weight: torch.Tensor, form: str) -> torch.Tensor:
        """The conv of `x` and `weight` (the module's, or a cast of it) in the depthwise or volumetric form."""
        if form == 'volumetric':
            return volumetric_form_conv(x, weight, self.stride, self.padding, self.dilation, self.groups)
        return depthwise_form_conv(
            x, weight, self.stride, self.padding, self.dilation, self.groups, self.group_sum_weight)

    @torch.jit.unused
    def _train_forward(self, x: torch.Tensor, form: str) -> torch.Tensor:
        return _FastFormGroupedBackward.apply(x, self.weight, self, form)


class PyramidSqueezeAttention(nn.Module):
    """PSA module: a drop-in replacement for a k x k convolution of `in_chs` -> `out_chs`.

    Args:
        in_chs: input channels; must be divisible by every branch's group count.
        out_chs: output channels (default `in_chs`); must be divisible by `num_scales` and each
            branch's share (out_chs / S) by that branch's group count.
        stride: stride of every branch convolution (EPSANet puts the block stride here).
        num_scales: S, the number of branches. Defaults to len(kernel_sizes) or 4.
        kernel_sizes: odd kernel of each branch; default (3, 5, 7, 9, ...) from the paper.
        groups: group count of each branch; default from the paper's eq. 3, (1, 4, 8, 16) for S=4.
        se_reduction: r of the shared SEWeight; it squeezes C' = out_chs / S to max(1, C' // r).
        dilation: dilation of every branch (timm's output_stride support).
        act_layer: activation inside SEWeight (ReLU in the paper).
        branch_form: how the branch convs are computed, one of `BRANCH_FORMS` (see
            `BranchConv2d`); the default picks per branch and device. Same weights and function.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: Optional[int] = None,
            stride: int = 1,
            num_scales: Optional[int] = None,
            kernel_sizes: Optional[Sequence[int]] = None,
            groups: Optional[Sequence[int]] = None,
            se_reduction: int = 16,
            dilation: int = 1,
            act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
            branch_form: str = 'auto',
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        out_chs = out_chs or in_chs
        if num_scales is None:
            num_scales = len(kernel_sizes) if kernel_sizes is not None else 4
        kernel_sizes = tuple(kernel_sizes) if kernel_sizes is not None else default_kernel_sizes(num_scales)
        groups = tuple(groups) if groups is not None else default_groups(kernel_sizes)
        _check_config(in_chs, out_chs, num_scales, kernel_sizes, groups, se_reduction)

        self.num_scales = num_scales
        self.split_chs = out_chs // num_scales
        self.kernel_sizes = kernel_sizes
        self.groups = groups
        self.convs = nn.ModuleList([
            BranchConv2d(
                in_chs,
                self.split_chs,
                kernel_size=k,
                stride=stride,
                padding=get_padding(k, stride, dilation),
                dilation=dilation,
                groups=g,
                bias=False,
                form=branch_form,
                **dd,
            )
            for k, g in zip(kernel_sizes, groups)
        ])
        self.se = SEWeight(
            self.split_chs,
            rd_channels=max(1, self.split_chs // se_reduction),
            act_layer=get_act_layer(act_layer),
            **dd,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            feats = [conv(x) for conv in self.convs]
            return self._attend(torch.cat(feats, dim=1))
        return self._attend(self._branches(x))

    @torch.jit.unused
    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated branch outputs, in x's layout. Each branch runs in the form and memory
        layout of its plan (on CPU up to 2x apart), converting x at most once per layout."""
        grad_enabled = torch.is_grad_enabled()
        low_precision = x.device.type == 'cpu' and computes_in_low_precision(x)
        plans = [conv.plan_for(x.device.type, grad_enabled, low_precision) for conv in self.convs]
        caller = layout_of(x)
        flexible = 'channels_last' if any(layout == 'channels_last' for _, layout in plans) else caller
        inputs = {caller: x}
        feats = []
        for conv, (form, layout) in zip(self.convs, plans):
            layout = flexible if layout == 'any' else layout
            if layout not in inputs:
                inputs[layout] = in_layout(x, layout)
            feats.append(conv.forward_as(inputs[layout], form))
        if grad_enabled or torch.compiler.is_compiling():
            return in_layout(torch.cat(feats, dim=1), caller)
        # write the concat straight into the caller's layout (a mixed-layout cat returns NCHW)
        B, _, H, W = feats[0].shape
        out = torch.empty(
            (B, self.num_scales * self.split_chs, H, W), dtype=feats[0].dtype, device=x.device,
            memory_format=torch.channels_last if caller == 'channels_last' else torch.contiguous_format)
        return torch.cat(feats, dim=1, out=out)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """SEWeight once over all S scales, softmax across the scales, reweighting."""
        B, _, H, W = x.shape
        x = x.reshape(B, self.num_scales, self.split_chs, H, W)
        attn = self.se(x.mean((3, 4)).reshape(B * self.num_scales, self.split_chs, 1, 1))
        attn = attn.reshape(B, self.num_scales, self.split_chs, 1, 1).softmax(dim=1)
        # x is this module's own buffer (the concat): reweight it in place when autograd is off
        x = x.mul_(attn) if not torch.is_grad_enabled() else x * attn
        return x.reshape(B, self.num_scales * self.split_chs, H, W)


def _check_config(
        in_chs: int,
        out_chs: int,
        num_scales: int,
        kernel_sizes: Tuple[int, ...],
        groups: Tuple[int, ...],
        se_reduction: int,
) -> None:
    """Reject impossible configs at construction, naming the numbers, before torch does it deep inside."""
    if num_scales < 1:
        raise ValueError(f'PSA needs at least one scale, got num_scales={num_scales}')
    if len(kernel_sizes) != num_scales:
        raise ValueError(
            f'PSA got {len(kernel_sizes)} kernel sizes {kernel_sizes} for num_scales={num_scales}')
    if len(groups) != num_scales:
        raise ValueError(f'PSA got {len(groups)} group sizes {groups} for num_scales={num_scales}')
    if se_reduction < 1:
        raise ValueError(f'PSA se_reduction must be >= 1, got {se_reduction}')
    if out_chs % num_scales:
        raise ValueError(
            f'PSA out_chs={out_chs} is not divisible by num_scales={num_scales}')
    split_chs = out_chs // num_scales
    for i, (k, g) in enumerate(zip(kernel_sizes, groups)):
        if k < 1 or k % 2 == 0:
            raise ValueError(f'PSA branch {i}: kernel size {k} must be odd and positive')
        if g < 1:
            raise ValueError(f'PSA branch {i}: groups={g} must be positive')
        if in_chs % g:
            raise ValueError(f'PSA branch {i} (kernel {k}): in_chs={in_chs} is not divisible by groups={g}')
        if split_chs % g:
            raise ValueError(
                f'PSA branch {i} (kernel {k}): its out_chs / num_scales = {out_chs} / {num_scales} = '
                f'{split_chs} channels are not divisible by groups={g}')
