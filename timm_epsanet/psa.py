""" Pyramid Squeeze Attention (PSA), the layer at the heart of EPSANet.

Paper: `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447 (Zhang et al., ACCV 2022)

PSA = SPC (S parallel convolutions with growing kernel and group sizes, each seeing the whole
input and producing C/S channels) + one SEWeight module shared by all S branches + a softmax
across the S scales + channel-wise reweighting + concatenation (paper eqs. 3-11).

Branches are concatenated in paper order (branch 0 first). The official code concatenates them
reversed; converting its weights is a permutation of the channels that follow PSA.

How the branch convs are computed (forms and memory layouts per device) is a backend,
`_branch_conv`, apart from the layer; so is the attention's Triton form, `_triton_attention`, which
runs with the branches' Triton kernels.
"""
from typing import Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from timm.layers import SEModule, get_act_layer, get_padding

from ._branch_conv import BRANCH_FORMS, BranchConv2d, BranchConvs
from ._branch_plans import TRITON_FORMS, calls_hooked, plain_eager, triton_attention_in_auto, triton_runs_on_cuda

__all__ = ['PyramidSqueezeAttention', 'SEWeight', 'default_groups', 'default_kernel_sizes']


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

    def forward(self, x: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """The gate of x; `pooled`: x is average-pooled to (N, C, 1, 1) already (PSA pools every
        scale at once, and calls this module on them: hooks on it see its gates)."""
        x_se = x if pooled else x.mean((2, 3), keepdim=True)
        return self.gate(self.fc2(self.act(self.bn(self.fc1(x_se)))))


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
        branch_form: how the branch convs are computed, one of ('auto', 'grouped', 'depthwise',
            'volumetric', 'dense', 'regrouped', 'triton', 'triton_mma', 'triton_spc'); 'auto' picks
            per branch and device. Same weights and function.
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
        if num_scales is None:
            num_scales = len(kernel_sizes) if kernel_sizes is not None else 4
        kernel_sizes = tuple(kernel_sizes) if kernel_sizes is not None else default_kernel_sizes(num_scales)
        groups = tuple(groups) if groups is not None else default_groups(kernel_sizes)
        _check_config(in_chs, out_chs, stride, dilation, num_scales, kernel_sizes, groups, se_reduction, branch_form)
        out_chs = in_chs if out_chs is None else out_chs

        self.num_scales = num_scales
        self.split_chs = out_chs // num_scales
        self.branch_form = branch_form
        self.kernel_sizes = kernel_sizes
        self.groups = groups
        self.convs = BranchConvs([
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
        x = self.convs(x)  # the S branch outputs, concatenated: (B, S * C', H, W)
        # x is this module's own buffer: reweight it in place where nothing else sees it, without
        # autograd, outside a trace (whose check reruns it without autograd and wants the same
        # graph), and with no forward hook on the branches, which may hold their output
        in_place = not (torch.is_grad_enabled() or torch.jit.is_tracing())
        if not torch.jit.is_scripting():
            in_place = in_place and not self._branches_hooked()
            if self._attention_on_triton(x):
                return self._attention_by_triton(x, in_place)
        B, C = x.shape[0], x.shape[1]
        # one SEWeight for all scales (each scale's pooled channels a batch entry of its own), then a
        # softmax across the scales. Only the small pooled tensors are reshaped, x never: each op,
        # and its backward, costs host time on a GPU
        x_attn = self.se(x.mean((2, 3), keepdim=True).reshape(B * self.num_scales, self.split_chs, 1, 1), pooled=True)
        # the softmax in x's dtype (it accumulates in fp32 for 16-bit floats): CUDA autocast would
        # return fp32 gates, and reweighting by them would promote the output, and the BN and
        # activation after it, to fp32 (twice the memory and traffic); casting them back costs ops
        x_attn = x_attn.reshape(B, self.num_scales, self.split_chs).softmax(dim=1, dtype=x.dtype)
        x_attn = x_attn.reshape(B, C, 1, 1)
        return x.mul_(x_attn) if in_place else x * x_attn

    @torch.jit.unused
    def _attention_on_triton(self, x: torch.Tensor) -> bool:
        """Whether the attention runs on the Triton backend (`_triton_attention`): with the branches' Triton
        kernels (their forms, or 'auto' with TIMM_EPSANET_TRITON=1), or alone for 'auto' branches with
        TIMM_EPSANET_TRITON=attention; in plain eager mode on CUDA."""
        # first what costs nothing: the CPU default returns here (a PSA pickled before it had a form: 'auto')
        form = getattr(self, 'branch_form', 'auto')
        if not (form in TRITON_FORMS or (form == 'auto' and triton_attention_in_auto())):
            return False
        if not plain_eager(x) or x.device.type != 'cuda' or not triton_runs_on_cuda():  # FX proxies: no device
            return False
        from . import _triton_attention  # imported only where it runs: it needs triton
        return _triton_attention.fusable(self.se)

    @torch.jit.unused
    def _branches_hooked(self) -> bool:
        """Whether a hook may see the branches' output (on them, or on every module)."""
        return calls_hooked((self.convs,))

    @torch.jit.unused
    def _attention_by_triton(self, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        from . import _triton_attention
        return _triton_attention.psa_attention(x, self.num_scales, self.se, in_place)


def _check_config(
        in_chs: int,
        out_chs: Optional[int],
        stride: int,
        dilation: int,
        num_scales: int,
        kernel_sizes: Tuple[int, ...],
        groups: Tuple[int, ...],
        se_reduction: int,
        branch_form: str,
) -> None:
    """Reject impossible configs at construction, naming the arguments and numbers as the
    caller passed them, before torch fails deep inside."""
    for name, value in (('in_chs', in_chs), ('out_chs', out_chs), ('stride', stride), ('dilation', dilation)):
        if value is not None and value < 1:
            raise ValueError(f'PSA {name} must be a positive integer, got {value!r}')
    # out_chs defaults to in_chs: name the argument the caller actually passed
    out_name = 'out_chs' if out_chs is not None else 'in_chs (the default out_chs)'
    out_chs = in_chs if out_chs is None else out_chs
    if num_scales < 1:
        raise ValueError(f'PSA needs at least one scale, got num_scales={num_scales}')
    if len(kernel_sizes) != num_scales:
        raise ValueError(
            f'PSA got {len(kernel_sizes)} kernel sizes {kernel_sizes} for num_scales={num_scales}')
    if len(groups) != num_scales:
        raise ValueError(f'PSA got {len(groups)} group sizes {groups} for num_scales={num_scales}')
    if se_reduction < 1:
        raise ValueError(f'PSA se_reduction must be >= 1, got {se_reduction}')
    if branch_form not in BRANCH_FORMS:
        raise ValueError(f'PSA branch_form must be one of {BRANCH_FORMS}, got {branch_form!r}')
    if out_chs % num_scales:
        raise ValueError(f'PSA {out_name}={out_chs} is not divisible by num_scales={num_scales}')
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
                f'PSA branch {i} (kernel {k}): its {out_name} / num_scales = {out_chs} / {num_scales} = '
                f'{split_chs} channels are not divisible by groups={g}')
