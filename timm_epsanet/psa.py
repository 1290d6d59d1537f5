""" Pyramid Squeeze Attention (PSA), the layer at the heart of EPSANet.

Paper: `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447 (Zhang et al., ACCV 2022)

PSA = SPC (S parallel convolutions with growing kernel and group sizes, each seeing the whole
input and producing C/S channels) + one SEWeight module shared by all S branches + a softmax
across the S scales + channel-wise reweighting + concatenation (paper eqs. 3-11).

Branches are concatenated in paper order (branch 0 first). The official code concatenates them
reversed; converting its weights is a permutation of the channels that follow PSA.
"""
from typing import Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import SEModule, get_act_layer, get_padding

__all__ = [
    'BRANCH_FORMS', 'BranchConv2d', 'PyramidSqueezeAttention', 'SEWeight', 'block_diagonal_weight',
    'default_groups', 'default_kernel_sizes', 'depthwise_form_conv', 'depthwise_pays_off',
]

# How a PSA branch's grouped conv is computed; every form gives the same function and state dict.
BRANCH_FORMS = ('auto', 'grouped', 'depthwise', 'dense')


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


def depthwise_pays_off(kernel_size: int, in_per_group: int, outs_per_group: int, low_precision: bool = False) -> bool:
    """Whether `BranchConv2d` should run in depthwise form on CPU.

    Measured with oneDNN, 2 threads, batch 8, channels-last (benchmarks/psa_branches.py, saved in
    benchmarks/results/psa_branches_cpu*.json). fp32: the depthwise form wins with 1-2 outputs per
    group, and with up to 4 for kernels of 5 and more. bf16 (`low_precision`, e.g. CPU autocast):
    its depthwise convs are slower, and it wins only for kernels of 5 and more with 1-2 outputs
    per group. On CUDA (H200, cuDNN, fp16 channels-last) it lost for every branch shape, its 9x9
    convs 3-7x slower, so the rule is for CPU only.
    """
    if in_per_group == 1:
        return False
    if low_precision:
        return outs_per_group <= 2 and kernel_size >= 5
    return outs_per_group <= 2 or (outs_per_group <= 4 and kernel_size >= 5)


def depthwise_form_conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
) -> torch.Tensor:
    """`F.conv2d(x, weight, None, stride, padding, dilation, groups)` computed as depthwise convs.

    Output r of group j is the sum over the group's input channels i of w[j, r, i] * x[i]: one
    depthwise conv of x with the weights w[:, r] followed by a sum over each group's channels.
    Same MACs, exact up to float summation order. Reduces and interleaves along the dimension
    that is innermost in memory, so the output keeps x's layout.
    """
    in_chs = x.shape[1]
    outs = weight.shape[0] // groups
    k_h, k_w = weight.shape[2], weight.shape[3]
    weight = weight.reshape(groups, outs, in_chs // groups, k_h, k_w)
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    ys = []
    for r in range(outs):
        w_r = weight[:, r].reshape(in_chs, 1, k_h, k_w).contiguous()  # plain layout, whatever the module's
        y = F.conv2d(x, w_r, None, stride, padding, dilation, in_chs)
        B, _, H, W = y.shape
        if channels_last:
            ys.append(y.permute(0, 2, 3, 1).reshape(B, H, W, groups, in_chs // groups).sum(-1))
        else:
            ys.append(y.reshape(B, groups, in_chs // groups, H, W).sum(2))
    if channels_last:
        y = ys[0] if outs == 1 else torch.stack(ys, dim=-1).flatten(3)
        return y.permute(0, 3, 1, 2)
    return ys[0] if outs == 1 else torch.stack(ys, dim=2).flatten(1, 2)


class _DepthwiseFormGroupedBackward(torch.autograd.Function):
    """Training: the depthwise form's fast forward, the grouped conv's (faster) backward."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        # autocast does not reach into backward: cast as autocast would cast a conv, and save
        # those, so that the backward conv sees one dtype (CUDA refuses fp16 input, fp32 weight)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            out = depthwise_form_conv(x, weight, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.conv_args = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return grad_x, grad_w, None, None, None, None


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
      * dense: a dense conv with `block_diagonal_weight`: `groups` times the MACs, but on one
        of the backends' best-tuned kernels.
      * auto: the form measured fastest (benchmarks/results): on CPU the depthwise form where
        `depthwise_pays_off`; on CUDA the dense form for inference when groups <= 16 (H200,
        EPSANet-50 Small, fp16 channels-last: 5542 img/s against 4467 grouped), the grouped
        conv in training (1589 img/s against 1506 dense); elsewhere the grouped conv.
    """

    def __init__(self, *args, form: str = 'auto', **kwargs):
        super().__init__(*args, **kwargs)
        if form not in BRANCH_FORMS:
            raise ValueError(f'BranchConv2d form must be one of {BRANCH_FORMS}, got {form!r}')
        in_per_group = self.in_channels // self.groups
        if self.groups == 1 or in_per_group == 1 or self.bias is not None:
            form = 'grouped'  # dense or depthwise already: nothing to reformulate
        self.form = form
        shape = (self.kernel_size[0], in_per_group, self.out_channels // self.groups)
        self.cpu_depthwise = depthwise_pays_off(*shape)
        self.cpu_depthwise_low_precision = depthwise_pays_off(*shape, low_precision=True)

    def form_for(self, device_type: str, grad_enabled: bool, low_precision: bool = False) -> str:
        """The form this branch computes on a device of `device_type` ('cpu', 'cuda', ...), with
        or without autograd, in fp32 or a 16-bit float (`low_precision`)."""
        if self.form != 'auto':
            return self.form
        if device_type == 'cpu' and (self.cpu_depthwise_low_precision if low_precision else self.cpu_depthwise):
            return 'depthwise'
        if device_type == 'cuda' and not grad_enabled and self.groups <= 16:
            return 'dense'
        return 'grouped'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = self.form
        if form == 'auto':
            if torch.jit.is_scripting():
                low_precision = x.dtype != torch.float32
            else:
                low_precision = self._computes_in_low_precision(x)
            form = self.form_for(x.device.type, torch.is_grad_enabled(), low_precision)
        if form == 'dense':
            weight = block_diagonal_weight(self.weight, self.groups)
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, 1)
        if form == 'grouped':
            return self._conv_forward(x, self.weight, self.bias)
        if not torch.is_grad_enabled():
            return depthwise_form_conv(x, self.weight, self.stride, self.padding, self.dilation, self.groups)
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        return self._train_forward(x)

    @torch.jit.unused
    def _computes_in_low_precision(self, x: torch.Tensor) -> bool:
        """Whether this conv will run in a 16-bit float: autocast, or 16-bit input and weights.
        Only the CPU rule asks (other device types, e.g. meta, have no autocast state to read)."""
        if x.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
            return torch.get_autocast_dtype('cpu') != torch.float32
        return x.dtype != torch.float32

    @torch.jit.unused
    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DepthwiseFormGroupedBackward.apply(x, self.weight, self.stride, self.padding, self.dilation, self.groups)


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
        # CPU backends run these grouped and depthwise convs (and their backward) several times
        # faster channels-last: convert once for all branches, and give the caller its layout back
        to_nchw = x.device.type == 'cpu' and not x.is_contiguous(memory_format=torch.channels_last)
        if to_nchw:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = []
        for conv in self.convs:
            feats.append(conv(x))
        x = torch.cat(feats, dim=1)
        B, _, H, W = x.shape
        x = x.reshape(B, self.num_scales, self.split_chs, H, W)
        # one pass of the shared SEWeight over all S scales, then softmax across the scales
        attn = self.se(x.mean((3, 4)).reshape(B * self.num_scales, self.split_chs, 1, 1))
        attn = attn.reshape(B, self.num_scales, self.split_chs, 1, 1).softmax(dim=1)
        # x is this module's own buffer (the concat): reweight it in place when autograd is off
        x = x.mul_(attn) if not torch.is_grad_enabled() else x * attn
        x = x.reshape(B, self.num_scales * self.split_chs, H, W)
        return x.contiguous() if to_nchw else x


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
