""" PSA's attention in two small Triton kernels: SEWeight, the softmax across scales, and the reweighting.

After its branches, PSA pools each scale, runs the shared SEWeight (two 1x1 convs, ReLU, sigmoid)
on every scale, softmaxes the gates across the scales and multiplies them into the branches. In
eager mode that is about a dozen tiny ops forward and twenty backward per PSA (with autocast's
weight casts), each costing the host more than the GPU; on an H200 the host bounded the step.
Here the pooled features go through one kernel per direction instead, one program per image:

  * forward (`_gate_kernel`): the hidden features, the gates and their softmax, in fp32 from the
    fp32 weights, written in the branches' dtype; then one multiply.
  * backward (`_gate_grad_kernel`): from the gradient of the attention (the output gradient
    times the branches, summed per channel), the gradient of the pooled features (divided by the
    pixel count, for one fused multiply-add into the input gradient) and each image's share of
    the four SEWeight parameters' gradients, summed over the images afterwards (deterministic).

The kernels loop over channel blocks, so a program's registers do not grow with the width. Only
SEWeight as PSA builds it (biases, ReLU, sigmoid, no norm) is fused (`fusable`); CUDA only (or
TRITON_INTERPRET=1), plain eager mode only: compile fuses the plain ops itself, and traces and
exports keep them.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from timm.layers import activations
from torch import nn
from torch.autograd.function import once_differentiable

from ._branch_plans import calls_hooked, next_pow2
from ._triton_branch import FMA, _check_device

__all__ = ['fusable', 'psa_attention']


@triton.jit
def _rows(S, R, S_P: tl.constexpr, R_P: tl.constexpr):
    """The scale and hidden-feature indices of a program's tiles, and which exist."""
    s = tl.arange(0, S_P)
    r = tl.arange(0, R_P)
    return s, s < S, r, r < R


@triton.jit
def _pooled_and_w1(p_ptr, w1_ptr, w1_r, w1_c, s, s_ok, r, r_ok, c, c_ok, C: tl.constexpr):
    """One channel block of an image's pooled features (scales x channels) and of W1 (hidden x channels)."""
    z = tl.load(p_ptr + s[:, None] * C + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    w1 = tl.load(w1_ptr + r[:, None] * w1_r + c[None, :] * w1_c, mask=r_ok[:, None] & c_ok[None, :],
                 other=0.0).to(tl.float32)
    return z, w1


@triton.jit
def _hidden(p_ptr, w1_ptr, b1_ptr, w1_r, w1_c, s, s_ok, r, r_ok,
            C: tl.constexpr, BLOCK_C: tl.constexpr, S_P: tl.constexpr, R_P: tl.constexpr):
    """One image's hidden features before the ReLU, (scales x hidden): pooled @ W1^T + b1."""
    h = tl.zeros((S_P, R_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        z, w1 = _pooled_and_w1(p_ptr, w1_ptr, w1_r, w1_c, s, s_ok, r, r_ok, c, c < C, C)
        h += tl.sum(z[:, None, :] * w1[None, :, :], axis=2)
    return h + tl.load(b1_ptr + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _gates(h, w2_ptr, b2_ptr, w2_c, w2_r, r, r_ok, c, c_ok, s_ok):
    """The sigmoid gates of one channel block, (scales x channels), and their softmax across the scales."""
    w2t = tl.load(w2_ptr + r[:, None] * w2_r + c[None, :] * w2_c, mask=r_ok[:, None] & c_ok[None, :],
                  other=0.0).to(tl.float32)
    pre = tl.sum(h[:, :, None] * w2t[None, :, :], axis=1) + tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    gate = tl.sigmoid(pre)
    logits = tl.where(s_ok[:, None], gate, float('-inf'))
    e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
    return gate, w2t, e / tl.sum(e, axis=0)[None, :]


@triton.jit
def _gate_kernel(p_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, a_ptr, w1_r, w1_c, w2_c, w2_r,
                 S: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                 S_P: tl.constexpr, R_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """a[b, s*C + c] = softmax over s of sigmoid(relu(p[b, s] @ W1^T + b1) @ W2^T + b2)[c]: image b's
    attention, from its pooled features p (S scales x C channels each)."""
    b = tl.program_id(0)
    s, s_ok, r, r_ok = _rows(S, R, S_P, R_P)
    p_ptr += b * S * C
    a_ptr += b * S * C
    h = tl.maximum(_hidden(p_ptr, w1_ptr, b1_ptr, w1_r, w1_c, s, s_ok, r, r_ok, C, BLOCK_C, S_P, R_P), 0.0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        _, _, attn = _gates(h, w2_ptr, b2_ptr, w2_c, w2_r, r, r_ok, c, c_ok, s_ok)
        tl.store(a_ptr + s[:, None] * C + c[None, :], attn.to(a_ptr.dtype.element_ty), mask=s_ok[:, None] & c_ok[None, :])


@triton.jit
def _gate_grad_kernel(p_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ga_ptr, gp_ptr, part_ptr, w1_r, w1_c, w2_c, w2_r,
                      inv_hw, S: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                      S_P: tl.constexpr, R_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Image b's gradients, given ga, the gradient of its attention: gp[b] = the pooled features'
    (times inv_hw), and part[b] = [W1 (R x C), b1 (R), W2 (C x R), b2 (C)] its share of the
    parameters', all from the forward recomputed."""
    b = tl.program_id(0)
    s, s_ok, r, r_ok = _rows(S, R, S_P, R_P)
    p_ptr += b * S * C
    ga_ptr += b * S * C
    gp_ptr += b * S * C
    part_ptr += b * (2 * R * C + R + C)
    pre1 = _hidden(p_ptr, w1_ptr, b1_ptr, w1_r, w1_c, s, s_ok, r, r_ok, C, BLOCK_C, S_P, R_P)
    h = tl.where(s_ok[:, None], tl.maximum(pre1, 0.0), 0.0)
    g_h = tl.zeros((S_P, R_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        gate, w2t, attn = _gates(h, w2_ptr, b2_ptr, w2_c, w2_r, r, r_ok, c, c_ok, s_ok)
        g_a = tl.load(ga_ptr + s[:, None] * C + c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        g_gate = attn * (g_a - tl.sum(attn * g_a, axis=0)[None, :])  # through the softmax
        g_pre2 = tl.where(s_ok[:, None] & c_ok[None, :], g_gate * gate * (1.0 - gate), 0.0)  # and the sigmoid
        g_w2t = tl.sum(g_pre2[:, None, :] * h[:, :, None], axis=0)  # (R_P, BLOCK_C): W2[c, r]'s
        tl.store(part_ptr + R * C + R + c[None, :] * R + r[:, None], g_w2t, mask=r_ok[:, None] & c_ok[None, :])
        tl.store(part_ptr + 2 * R * C + R + c, tl.sum(g_pre2, axis=0), mask=c_ok)
        g_h += tl.sum(g_pre2[:, None, :] * w2t[None, :, :], axis=2)
    g_pre1 = tl.where((pre1 > 0) & s_ok[:, None] & r_ok[None, :], g_h, 0.0)  # through the ReLU
    tl.store(part_ptr + R * C + r, tl.sum(g_pre1, axis=0), mask=r_ok)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        z, w1 = _pooled_and_w1(p_ptr, w1_ptr, w1_r, w1_c, s, s_ok, r, r_ok, c, c_ok, C)
        tl.store(part_ptr + r[:, None] * C + c[None, :], tl.sum(g_pre1[:, :, None] * z[:, None, :], axis=0),
                 mask=r_ok[:, None] & c_ok[None, :])
        g_p = tl.sum(g_pre1[:, :, None] * w1[None, :, :], axis=1) * inv_hw
        tl.store(gp_ptr + s[:, None] * C + c[None, :], g_p.to(gp_ptr.dtype.element_ty), mask=s_ok[:, None] & c_ok[None, :])


def fusable(se: nn.Module) -> bool:
    """Whether the kernels compute this SEWeight: 1x1 convs with biases, no norm, ReLU and sigmoid
    (torch's modules or timm's), with no hook on its modules' calls (`calls_hooked`)."""
    convs = (se.fc1, se.fc2)
    return (all(type(fc) is nn.Conv2d and fc.kernel_size == (1, 1) and fc.groups == 1 and fc.bias is not None
                for fc in convs)
            and type(se.bn) is nn.Identity and type(se.act) is nn.ReLU
            and type(se.gate) in (nn.Sigmoid, activations.Sigmoid) and not calls_hooked(se.modules()))


def _sizes(num_scales: int, w1: torch.Tensor) -> Tuple[int, int, int, int, int, int]:
    """S, C, R (from fc1's weight, R x C x 1 x 1) and the kernels' blocks: scales and hidden
    features padded to a power of two, and channel blocks of a (scales x hidden x channels)
    product tile of about 4K values."""
    hidden, chs = w1.shape[:2]
    s_p, r_p = max(2, next_pow2(num_scales)), max(2, next_pow2(hidden))
    block_c = max(2, min(next_pow2(chs), 4096 // (s_p * r_p)))
    return num_scales, chs, hidden, s_p, r_p, block_c


def _strides(w1: torch.Tensor, w2: torch.Tensor) -> Tuple[int, int, int, int]:
    """fc1's weight's strides along (R, C) and fc2's along (C, R): the kernels read the 1x1 conv
    weights in place, in either memory format."""
    return w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1)


def _attention(pooled, num_scales, w1, b1, w2, b2, dtype: torch.dtype) -> torch.Tensor:
    """The attention of every image, (B, S*C, 1, 1) in `dtype`, from its pooled features (fp32)."""
    attn = torch.empty(pooled.shape, dtype=dtype, device=pooled.device)
    s, c, r, s_p, r_p, block_c = _sizes(num_scales, w1)
    _gate_kernel[(pooled.shape[0],)](pooled, w1, b1, w2, b2, attn, *_strides(w1, w2), S=s, C=c, R=r, S_P=s_p,
                                     R_P=r_p, BLOCK_C=block_c, **FMA)
    return attn


class _PsaAttention(torch.autograd.Function):
    """x times its attention, differentiable in x and SEWeight's four parameters."""

    @staticmethod
    def forward(ctx, x, num_scales, w1, b1, w2, b2):
        pooled = x.mean((2, 3), keepdim=True, dtype=torch.float32)
        attn = _attention(pooled, num_scales, w1, b1, w2, b2, x.dtype)
        ctx.save_for_backward(x, pooled, attn, w1, b1, w2, b2)
        ctx.num_scales = num_scales
        return x * attn

    @staticmethod
    @once_differentiable  # the kernels' gradients are not differentiable: double backward raises
    def backward(ctx, grad):
        x, pooled, attn, *params = ctx.saved_tensors
        w1, b1, w2, b2 = params
        grad_attn = (grad * x).sum((2, 3), dtype=torch.float32)
        grad_pooled = torch.empty(pooled.shape, dtype=grad.dtype, device=grad.device)  # over the pixels
        s, c, r, s_p, r_p, block_c = _sizes(ctx.num_scales, w1)
        parts = torch.empty((x.shape[0], 2 * r * c + r + c), dtype=torch.float32, device=x.device)
        _gate_grad_kernel[(x.shape[0],)](
            pooled, w1, b1, w2, b2, grad_attn, grad_pooled, parts, *_strides(w1, w2), 1.0 / (x.shape[2] * x.shape[3]),
            S=s, C=c, R=r, S_P=s_p, R_P=r_p, BLOCK_C=block_c, **FMA)
        grad_x = torch.addcmul(grad_pooled, grad, attn)  # the mean's share, spread over the pixels, + the product's
        grads = [g.view(p.shape) for g, p in zip(parts.sum(0).split([r * c, r, c * r, c]), params)]
        return (grad_x, None, *(g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)))


def psa_attention(x: torch.Tensor, num_scales: int, se: nn.Module, in_place: bool = False) -> torch.Tensor:
    """PSA after its branches: x, the branches' outputs concatenated (B, S*C, H, W), times the
    softmax across the S scales of SEWeight `se` of each scale's pooled features (`fusable`).
    Without autograd, x is reweighted in place where `in_place` allows it."""
    _check_device(x)
    params = (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)
    if not torch.is_grad_enabled():
        pooled = x.mean((2, 3), keepdim=True, dtype=torch.float32)
        attn = _attention(pooled, num_scales, *params, x.dtype)
        return x.mul_(attn) if in_place else x * attn
    return _PsaAttention.apply(x, num_scales, *params)
