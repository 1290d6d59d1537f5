""" Forms of a PSA branch: a grouped conv with few outputs per group, computed other ways.

Every function here computes `F.conv2d(x, weight, None, stride, padding, dilation, groups)`,
exactly up to float summation order, with the grouped conv's weight. They exist because CPU
backends run grouped convs with large kernels and 1-4 outputs per group far below their dense
rate; `_branch_plans` says where each one pays, `_branch_conv.BranchConv2d` applies them.
"""
import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._branch_plans import autocast_dtype, layout_of


def sums_groups_by_conv(out_chs: int) -> bool:
    """Whether the depthwise form sums its groups with a 1x1 conv (see `depthwise_form_conv`)."""
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
    """The grouped conv as depthwise convs followed by a sum over each group's channels.

    Output r of group j is the sum over the group's input channels i of w[j, r, i] * x[i]: one
    depthwise conv of x with the weights w[:, r], then a sum over each group. Same MACs; the
    output keeps x's memory layout.

    The group sum is a reduction over channels, innermost in channels-last memory, where torch's
    reductions are slow: for narrow outputs (`sums_groups_by_conv`) the caller passes `sum_weight`
    (from `group_sum_weight`), and the sum runs as a 1x1 conv with those 0/1 weights instead. The
    caller decides, from its own sizes: a traced module's weight shapes are traced values, and a
    test on them would warn that the trace may not generalize.
    """
    out_chs, in_per_group, k_h, k_w = weight.shape
    in_chs = in_per_group * groups  # from the weight, not x: exported graphs fold the weights to constants
    outs = out_chs // groups
    # depthwise weights of output r: input channel c = j * in_per_group + i gets w[j * outs + r, i]
    dw_weight = weight.reshape(groups, outs, in_per_group, k_h, k_w).transpose(0, 1).reshape(outs, in_chs, 1, k_h, k_w)
    if sum_weight is not None:
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
        y = ys[0] if len(ys) == 1 else torch.stack(ys, dim=-1).flatten(3)
        return y.permute(0, 3, 1, 2)
    return ys[0] if len(ys) == 1 else torch.stack(ys, dim=2).flatten(1, 2)


def group_sum_weight(
        in_chs: int,
        groups: int,
        outs: int,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """(outs * out_chs, in_chs, 1, 1) 0/1 weights, out_chs = groups * outs: rows r * out_chs to
    (r + 1) * out_chs map input channel j * in_per_group + i to output j * outs + r, so that a 1x1
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
    """The grouped conv as depthwise conv3ds over x viewed as a volume. Returns NCHW.

    Viewed as (N, groups, in_per_group, H, W), NCHW x holds each group as one channel whose
    depth is the group's input channels; output r of every group is then a depthwise conv3d with
    kernel depth in_per_group and no depth padding (output depth 1). Same MACs as the grouped
    conv, and unlike the depthwise form no intermediate the size of x and no group sum.
    """
    B, in_chs, H, W = x.shape
    out_chs, in_per_group, k_h, k_w = weight.shape
    outs = out_chs // groups
    volume = x.contiguous().view(B, groups, in_per_group, H, W)
    # weights of output r of every group: (groups, 1, in_per_group, k_h, k_w)
    weights = weight.reshape(groups, outs, 1, in_per_group, k_h, k_w).transpose(0, 1).contiguous()
    ys = [F.conv3d(volume, weights[r], None, (1, stride[0], stride[1]), (0, padding[0], padding[1]),
                   (1, dilation[0], dilation[1]), groups) for r in range(outs)]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)  # (B, groups, outs, H_out, W_out)
    return y.flatten(1, 2)


def regroup_factor(groups: int, outs_per_group: int, min_outs: int = 8) -> int:
    """How many adjacent groups the regrouped form merges: the smallest divisor m of `groups` with
    m * outs_per_group >= `min_outs` (all of them, the dense conv, when none reaches it; 1, the
    grouped conv itself, when each group has that many outputs already)."""
    for m in range(1, groups + 1):
        if groups % m == 0 and m * outs_per_group >= min_outs:
            return m
    return groups


def block_diagonal_weight(
        weight: torch.Tensor,
        groups: int,
        merge: Optional[int] = None,
        mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The weight of the conv of `groups // merge` groups equal to a grouped conv of `groups`:
    `merge` adjacent groups per merged group, each block-diagonal (each group's block, zeros
    elsewhere). `merge=None` merges all: the dense conv.

    `merge` times the MACs, but on wider groups (or dense), which the backends' tuned kernels run
    far faster than 1-4 outputs per group. Differentiable, so training this form trains the
    grouped weight (the zeros pass no gradient to it). `mask`: `block_mask` of the merge, the
    weight's dtype and device, where the caller keeps one (training builds this weight every step).
    """
    m = groups if merge is None else merge
    out_chs, in_per_group, k_h, k_w = weight.shape
    w = weight.reshape(groups // m, m, out_chs // groups, 1, in_per_group, k_h, k_w)
    if mask is None:
        mask = block_mask(m, weight.dtype, weight.device)
    return (w * mask).reshape(out_chs, m * in_per_group, k_h, k_w)


def block_mask(merge: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 0/1 mask that `block_diagonal_weight` multiplies a weight of `merge` merged groups by."""
    return torch.eye(merge, dtype=dtype, device=device).reshape(1, merge, 1, merge, 1, 1, 1)


def fast_form_conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        form: str,
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
        sum_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The conv in the 'depthwise' or 'volumetric' form."""
    if form == 'volumetric':
        return volumetric_form_conv(x, weight, stride, padding, dilation, groups)
    return depthwise_form_conv(x, weight, stride, padding, dilation, groups, sum_weight)


def autocast_conv_inputs(x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x and weight cast as autocast casts a conv's: an autograd Function or a custom op is
    outside autocast's op lists, and its backward sees one dtype (CUDA refuses fp16 x with an
    fp32 weight)."""
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        return x.to(dtype), weight.to(dtype)
    return x, weight


class FastFormGroupedBackward(torch.autograd.Function):
    """Training: a fast form's forward with the grouped conv's backward (CPU backends run the
    grouped conv's backward faster than the fast forms'), its weight gradient through FFTs where
    `fft_weight_grad_pays_off`."""

    @staticmethod
    def forward(ctx, x, weight, sum_weight, form, stride, padding, dilation, groups):
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:  # saved as cast: the backward conv sees one dtype; autocast off for the forms' ops
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
            out = fast_form_conv(x, weight, form, stride, padding, dilation, groups, sum_weight)
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (stride, padding, dilation, groups)
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
        return grad_x, grad_w, None, None, None, None, None, None


def fft_weight_grad_pays_off(x: torch.Tensor, weight: torch.Tensor, stride, dilation) -> bool:
    """Whether `fft_weight_grad` beats the backend's weight gradient: CPU, fp32, stride and
    dilation 1, kernels of 7 and more on maps of 28x28 and more, where the direct gradient's
    cost grows with the kernel area and the FFT's does not (benchmarks/README.md)."""
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

    A direct weight gradient for large kernels with few channels per group runs at a few
    GMAC/s; in the frequency domain it is one elementwise product per (group, output, input)
    pair (cuDNN offers FFT algorithms for the same reason).

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
