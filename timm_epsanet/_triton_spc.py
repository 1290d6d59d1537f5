""" Tensor-core Triton kernels for several PSA branches at once: SPC in one pass over the input.

In the 'triton_mma' form each branch is its own conv, and each reads the whole input once per tap.
Once their groups are merged into groups of 16 or more outputs, EPSANet's grouped branches mostly
read the same input slices: in Large all four do, and in Small those of kernels 5, 7 and 9 (all
but the last stage; at stage 1 the dense kernel-3 branch too). Every tap offset of a smaller
centred kernel is also a tap offset of a larger one. So here one program per (pixel tile, input
slice) walks the taps of the largest kernel ring by ring: the centre, then squares of growing
radius. It loads each shifted input tile once and multiplies it into the accumulator of every
branch whose kernel reaches that ring. The
products are the same; the tile reads are fewer (one per tap of the largest kernel instead of one
per tap of every kernel); the outputs go straight into their concatenation.

The input gradient is the same walk read the other way. Each input pixel sums the shares of
every branch in one accumulator, instead of autograd adding the branches' full-size input
gradients. At stride > 1 that walk would mask most taps, so each branch runs `_triton_branch`'s
phased kernel and the shares are added. The weight gradients: one program per tap of the largest
kernel reads each shifted input tile once for every branch that reaches the tap, and sums its
products with each branch's output gradient (one product per branch, or one for all of them side
by side: `Config.stack_branches`; or, at stride 1, one program per two adjacent taps from one read
of each input tile: `Config.pair_taps`), per chunk of pixels (added afterwards in fp32).

Branches fuse when they are grouped convs of the same input with the same merged groups (input
and output channels per group), stride and dilation, odd kernels in ascending order, and padding
that centres them ("same" convs, as PSA's are): `fusable`. Private to the package, like
`_triton_branch`, and registered as custom ops (`timm_epsanet::spc_conv*`), which compile,
export and fake tensors see. In plain eager mode `spc_conv_grouped` skips the custom ops'
dispatch layers and the per-branch weight preparation around them: one autograd node merges,
casts and lays out every branch's weights in one small launch (`_tiles_kernel`), and reads the
grouped weights' gradients off the kernel's partial sums in another (`_weight_grads_kernel`).
The host, not the GPU, bounded the fused training step on an H200.
"""
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._branch_forms import block_diagonal_weight
from ._branch_plans import in_layout, layout_of, plain_eager
from ._triton_branch import (
    _cdiv, _check_device, _dst_pixels, _empty_like_layout, _grad_input_op, _group_block, _launch_conv_tiles, _out_size,
    FMA, _precision, _tile_pixels, _weight_grad_part, branch_conv, mma_config_for, weight_grad_chunks,
    weight_grad_of_part,
)

__all__ = ['fusable', 'spc_conv', 'spc_conv_grouped']

MAX_BRANCHES = 4  # the kernels' weight arguments; PSA's default S


@triton.jit
def _ring_tap(i, RING: tl.constexpr):
    """Tap offset (rows, columns) from the centre of tap i of the square ring of radius RING: the
    8 * RING taps whose larger offset is RING, clockwise from the top-left corner (RING 0: the centre)."""
    if RING == 0:
        return i * 0, i * 0
    side = i // (2 * RING)
    pos = i % (2 * RING) - RING  # -RING .. RING - 1 along the side
    dh = tl.where(side == 0, -RING, tl.where(side == 1, pos, tl.where(side == 2, RING, -pos)))
    dw = tl.where(side == 0, pos, tl.where(side == 1, RING, tl.where(side == 2, -pos, -RING)))
    return dh, dw


@triton.jit
def _inside(i, size):
    """0 <= i < size, as one unsigned comparison."""
    return i.to(tl.uint32, bitcast=True) < size


@triton.jit
def _tap_weight(w_ptr, RADIUS: tl.constexpr, dh, dw, g, red, red_ok, out, out_ok, G, C_RED: tl.constexpr,
                C_OUT: tl.constexpr):
    """The (reduced x written) weight tile of tap offset (dh, dw) of a kernel of RADIUS, from its
    (KH, KW, G, C_RED, C_OUT) contiguous weight."""
    tap = (dh + RADIUS) * (2 * RADIUS + 1) + dw + RADIUS
    return tl.load(w_ptr + ((tap * G + g) * C_RED + red)[:, None] * C_OUT + out[None, :],
                   mask=red_ok[:, None] & out_ok[None, :], other=0.0)


@triton.jit
def _fused_pixels(pid, N, H_dst, W_dst, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    """The destination pixels of a fused program (image, row, column, exists): BLOCK_P consecutive
    pixels (TILE_W 0), or BLOCK_P // TILE_W rows x TILE_W columns of one image (`Config.tile_w`),
    whose shifted copies overlap more from one tap to the next: L1's reuse, where loads go
    through it."""
    if TILE_W == 0:
        n, oh, ow, p_ok, _, _, _, _ = _dst_pixels(pid, N, H_dst, W_dst, 1, 1, 0, 0, BLOCK_P, False)
    else:
        n, oh, ow, p_ok = _tile_pixels(pid, H_dst, W_dst, BLOCK_P // TILE_W, TILE_W)
    return n, oh, ow, p_ok


# sizes are not specialized on (a batch of 2 compiles what a batch of 128 runs); strides are
@triton.jit(do_not_specialize=['N', 'H', 'W', 'H_out', 'W_out'])
def _spc_mma_kernel(
        x_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, y_ptr,
        N, H, W, H_out, W_out,
        x_n, x_h, x_w, x_c,
        y_n, y_h, y_w, y_c,
        stride_h, stride_w, dil_h, dil_w,
        G,
        R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,  # radii; -1: no branch
        R_MAX: tl.constexpr,
        C_RED: tl.constexpr, C_OUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, TILE_W: tl.constexpr,
):
    """y[p, b*G*C_OUT + g*C_OUT + o] = sum over the taps (dh, dw) of branch b's kernel and r of
    x[p*stride + (dh, dw)*dil, g*C_RED + r] * w_b[tap, g, r, o], for up to 4 branches b of radii
    R0 <= R1 <= R2 <= R3. Each program: one tile of pixels (`_fused_pixels`), one group (input
    slice), BLOCK_O of its written channels, all branches."""
    g, o, o_ok = _group_block(C_OUT, BLOCK_O)
    n, oh, ow, p_ok = _fused_pixels(tl.program_id(0), N, H_out, W_out, BLOCK_P, TILE_W)
    r_block = tl.arange(0, BLOCK_R)
    # each tap reads the centre's pixel shifted by a scalar: its address and bounds are one add each
    oh = oh * stride_h
    ow = ow * stride_w
    centre = n * x_n + oh * x_h + ow * x_w

    acc0 = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for ring in tl.static_range(R_MAX + 1):  # which branches a ring feeds is known at compile time
        for i in range(8 * ring + (ring == 0)):
            dh, dw = _ring_tap(i, ring)
            pix_ok = p_ok & _inside(oh + dh * dil_h, H) & _inside(ow + dw * dil_w, W)
            pix = centre + dh * dil_h * x_h + dw * dil_w * x_w
            for r0 in range(0, C_RED, BLOCK_R):
                r = r0 + r_block
                r_ok = r < C_RED
                xv = tl.load(x_ptr + pix[:, None] + ((g * C_RED + r) * x_c)[None, :],
                             mask=pix_ok[:, None] & r_ok[None, :], other=0.0)
                if R0 >= ring:
                    acc0 = tl.dot(xv, _tap_weight(w0_ptr, R0, dh, dw, g, r, r_ok, o, o_ok, G, C_RED, C_OUT),
                                  acc0, input_precision=PRECISION)
                if R1 >= ring:
                    acc1 = tl.dot(xv, _tap_weight(w1_ptr, R1, dh, dw, g, r, r_ok, o, o_ok, G, C_RED, C_OUT),
                                  acc1, input_precision=PRECISION)
                if R2 >= ring:
                    acc2 = tl.dot(xv, _tap_weight(w2_ptr, R2, dh, dw, g, r, r_ok, o, o_ok, G, C_RED, C_OUT),
                                  acc2, input_precision=PRECISION)
                if R3 >= ring:
                    acc3 = tl.dot(xv, _tap_weight(w3_ptr, R3, dh, dw, g, r, r_ok, o, o_ok, G, C_RED, C_OUT),
                                  acc3, input_precision=PRECISION)

    y = y_ptr + (n * y_n + oh // stride_h * y_h + ow // stride_w * y_w)[:, None] + ((g * C_OUT + o) * y_c)[None, :]
    mask = p_ok[:, None] & o_ok[None, :]
    branch = G * C_OUT * y_c  # channel offset from one branch's outputs to the next's
    tl.store(y, acc0.to(y_ptr.dtype.element_ty), mask=mask)
    if R1 >= 0:
        tl.store(y + branch, acc1.to(y_ptr.dtype.element_ty), mask=mask)
    if R2 >= 0:
        tl.store(y + 2 * branch, acc2.to(y_ptr.dtype.element_ty), mask=mask)
    if R3 >= 0:
        tl.store(y + 3 * branch, acc3.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_share(acc, gy_ptr, w_ptr, RADIUS: tl.constexpr, dh, dw, pix, pix_ok, g, red, red_ok, i, i_ok, G,
                y_c, C_RED: tl.constexpr, C_IN: tl.constexpr, PRECISION: tl.constexpr):
    """acc plus one branch's share of the input gradient at tap offset (dh, dw): its output gradient's
    (pixels x reduced) tile times the tap's transposed (reduced x written) weight tile."""
    gv = tl.load(gy_ptr + pix[:, None] + ((g * C_RED + red) * y_c)[None, :],
                 mask=pix_ok[:, None] & red_ok[None, :], other=0.0)
    return tl.dot(gv, _tap_weight(w_ptr, RADIUS, dh, dw, g, red, red_ok, i, i_ok, G, C_RED, C_IN),
                  acc, input_precision=PRECISION)


@triton.jit(do_not_specialize=['N', 'H', 'W', 'H_out', 'W_out'])
def _spc_grad_input_mma_kernel(
        gy_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, gx_ptr,
        N, H, W, H_out, W_out,
        y_n, y_h, y_w, y_c,
        x_n, x_h, x_w, x_c,
        stride_h, stride_w, dil_h, dil_w,  # stride 1 (`_spc_mma_kernel`'s arguments)
        G,
        R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R_MAX: tl.constexpr,
        C_RED: tl.constexpr, C_OUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, TILE_W: tl.constexpr,
):
    """The input gradient of `_spc_mma_kernel` at stride 1: gx[p, g*C_OUT + i] = sum over branches b,
    their taps (dh, dw) and r of gy[p - (dh, dw)*dil, b*G*C_RED + g*C_RED + r] * w_b[tap, g, i, r]
    (reduced: a branch's outputs per group, C_RED; written: the group's inputs, C_OUT; the weights
    group-transposed: (KH, KW, G, C_RED, C_OUT)). One accumulator per program for all branches."""
    g, i, i_ok = _group_block(C_OUT, BLOCK_O)
    n, ih, iw, p_ok = _fused_pixels(tl.program_id(0), N, H, W, BLOCK_P, TILE_W)
    r_block = tl.arange(0, BLOCK_R)
    branch = G * C_RED * y_c  # channel offset from one branch's output gradients to the next's
    centre = n * y_n + ih * y_h + iw * y_w

    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for ring in tl.static_range(R_MAX + 1):
        for t in range(8 * ring + (ring == 0)):
            dh, dw = _ring_tap(t, ring)
            pix_ok = p_ok & _inside(ih - dh * dil_h, H_out) & _inside(iw - dw * dil_w, W_out)
            pix = centre - dh * dil_h * y_h - dw * dil_w * y_w
            for r0 in range(0, C_RED, BLOCK_R):
                r = r0 + r_block
                r_ok = r < C_RED
                if R0 >= ring:
                    acc = _grad_share(acc, gy_ptr, w0_ptr, R0, dh, dw, pix, pix_ok, g, r, r_ok, i, i_ok, G,
                                      y_c, C_RED, C_OUT, PRECISION)
                if R1 >= ring:
                    acc = _grad_share(acc, gy_ptr + branch, w1_ptr, R1, dh, dw, pix, pix_ok, g, r, r_ok, i, i_ok,
                                      G, y_c, C_RED, C_OUT, PRECISION)
                if R2 >= ring:
                    acc = _grad_share(acc, gy_ptr + 2 * branch, w2_ptr, R2, dh, dw, pix, pix_ok, g, r, r_ok, i,
                                      i_ok, G, y_c, C_RED, C_OUT, PRECISION)
                if R3 >= ring:
                    acc = _grad_share(acc, gy_ptr + 3 * branch, w3_ptr, R3, dh, dw, pix, pix_ok, g, r, r_ok, i,
                                      i_ok, G, y_c, C_RED, C_OUT, PRECISION)

    gx = gx_ptr + (n * x_n + ih * x_h + iw * x_w)[:, None] + ((g * C_OUT + i) * x_c)[None, :]
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=p_ok[:, None] & i_ok[None, :])


@triton.jit
def _weight_grad_share(acc, xt, gy_ptr, pix, p_ok, g, o, o_ok, y_c, C_OUT: tl.constexpr, PRECISION: tl.constexpr):
    """acc plus one branch's products at one tap over a pixel tile: the shifted input tile
    (transposed: channels x pixels) times the branch's output-gradient tile (pixels x outputs)."""
    gv = tl.load(gy_ptr + pix[:, None] + ((g * C_OUT + o) * y_c)[None, :], mask=p_ok[:, None] & o_ok[None, :],
                 other=0.0)
    return tl.dot(xt, gv, acc, input_precision=PRECISION)


@triton.jit
def _store_tap_part(part_ptr, acc, RADIUS: tl.constexpr, dh, dw, chunk, g, r, r_ok, o, o_ok, G,
                    C_IN: tl.constexpr, C_OUT: tl.constexpr):
    """Store a branch's partial weight gradient of tap offset (dh, dw) into its
    (chunks, KH, KW, G, C_IN, C_OUT) partial sums."""
    k = 2 * RADIUS + 1
    tap = (dh + RADIUS) * k + dw + RADIUS
    dst = part_ptr + ((chunk * k * k + tap) * G + g) * (C_IN * C_OUT) + (r * C_OUT)[:, None] + o[None, :]
    tl.store(dst, acc, mask=r_ok[:, None] & o_ok[None, :])


@triton.jit
def _shifted_input_tile(x_ptr, t, dh, dw, g, r, r_ok, H, W, H_out, W_out, x_n, x_h, x_w, x_c, stride_h, stride_w,
                        dil_h, dil_w, C_IN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Output pixel tile t (`_tile_pixels`) and the input its pixels read at tap offset (dh, dw), as
    the weight gradient's left operand (channels x pixels): (tile, image, rows, columns, pixel exists)."""
    n, oh, ow, p_ok = _tile_pixels(t, H_out, W_out, BLOCK_H, BLOCK_W)
    ih = oh * stride_h + dh * dil_h
    iw = ow * stride_w + dw * dil_w
    x_ok = p_ok & _inside(ih, H) & _inside(iw, W)
    xv = tl.load(x_ptr + (n * x_n + ih * x_h + iw * x_w)[:, None] + ((g * C_IN + r) * x_c)[None, :],
                 mask=x_ok[:, None] & r_ok[None, :], other=0.0)
    return tl.trans(xv), n, oh, ow, p_ok


@triton.jit
def _spc_weight_grad_tap(
        x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o, o_ok,
        N, H, W, H_out, W_out, x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w,
        G, TILES_PER_CHUNK,
        FIRST: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
        C_IN: tl.constexpr, C_OUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """The partial weight gradients of one tap offset for the branches from FIRST on (those whose
    kernels reach it: radii ascend), over one chunk of pixel tiles: each shifted input tile read
    once for all of them."""
    acc0 = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    branch = G * C_OUT * y_c  # channel offset from one branch's output gradients to the next's
    n_tiles = N * tl.cdiv(H_out, BLOCK_H) * tl.cdiv(W_out, BLOCK_W)
    for t in range(chunk * TILES_PER_CHUNK, tl.minimum((chunk + 1) * TILES_PER_CHUNK, n_tiles)):
        xt, n, oh, ow, p_ok = _shifted_input_tile(x_ptr, t, dh, dw, g, r, r_ok, H, W, H_out, W_out, x_n, x_h, x_w,
                                                  x_c, stride_h, stride_w, dil_h, dil_w, C_IN, BLOCK_H, BLOCK_W)
        pix = n * y_n + oh * y_h + ow * y_w
        if FIRST <= 0 and R0 >= 0:
            acc0 = _weight_grad_share(acc0, xt, gy_ptr, pix, p_ok, g, o, o_ok, y_c, C_OUT, PRECISION)
        if FIRST <= 1 and R1 >= 0:
            acc1 = _weight_grad_share(acc1, xt, gy_ptr + branch, pix, p_ok, g, o, o_ok, y_c, C_OUT, PRECISION)
        if FIRST <= 2 and R2 >= 0:
            acc2 = _weight_grad_share(acc2, xt, gy_ptr + 2 * branch, pix, p_ok, g, o, o_ok, y_c, C_OUT, PRECISION)
        if FIRST <= 3 and R3 >= 0:
            acc3 = _weight_grad_share(acc3, xt, gy_ptr + 3 * branch, pix, p_ok, g, o, o_ok, y_c, C_OUT, PRECISION)
    if FIRST <= 0 and R0 >= 0:
        _store_tap_part(p0_ptr, acc0, R0, dh, dw, chunk, g, r, r_ok, o, o_ok, G, C_IN, C_OUT)
    if FIRST <= 1 and R1 >= 0:
        _store_tap_part(p1_ptr, acc1, R1, dh, dw, chunk, g, r, r_ok, o, o_ok, G, C_IN, C_OUT)
    if FIRST <= 2 and R2 >= 0:
        _store_tap_part(p2_ptr, acc2, R2, dh, dw, chunk, g, r, r_ok, o, o_ok, G, C_IN, C_OUT)
    if FIRST <= 3 and R3 >= 0:
        _store_tap_part(p3_ptr, acc3, R3, dh, dw, chunk, g, r, r_ok, o, o_ok, G, C_IN, C_OUT)


@triton.jit
def _store_stacked_parts(p0_ptr, p1_ptr, p2_ptr, p3_ptr, acc, dh, dw, chunk, g, r, r_ok, o, col_ok, b, G,
                         FIRST: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
                         R3: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr):
    """Each branch's columns of a stacked product (`_spc_weight_grad_stacked_tap`) into its partial
    sums at tap offset (dh, dw), where its kernel reaches that tap (a column of no branch, or of a
    branch that does not reach the tap, is masked in all four)."""
    # the tap's ring as a block: Triton's interpreter gives a scalar comparison broadcast into a
    # mask an int32 payload, which triton 3.9's interpreter refuses as a mask
    ring = tl.broadcast_to(tl.maximum(tl.abs(dh), tl.abs(dw)), b.shape)
    if FIRST <= 0 and R0 >= 0:
        _store_tap_part(p0_ptr, acc, R0, dh, dw, chunk, g, r, r_ok, o, col_ok & (b == 0) & (ring <= R0), G, C_IN, C_OUT)
    if FIRST <= 1 and R1 >= 0:
        _store_tap_part(p1_ptr, acc, R1, dh, dw, chunk, g, r, r_ok, o, col_ok & (b == 1) & (ring <= R1), G, C_IN, C_OUT)
    if FIRST <= 2 and R2 >= 0:
        _store_tap_part(p2_ptr, acc, R2, dh, dw, chunk, g, r, r_ok, o, col_ok & (b == 2) & (ring <= R2), G, C_IN, C_OUT)
    if FIRST <= 3 and R3 >= 0:
        _store_tap_part(p3_ptr, acc, R3, dh, dw, chunk, g, r, r_ok, o, col_ok & (b == 3) & (ring <= R3), G, C_IN, C_OUT)


@triton.jit
def _spc_weight_grad_stacked_tap(
        x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o0,
        N, H, W, H_out, W_out, x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w,
        G, TILES_PER_CHUNK,
        FIRST: tl.constexpr, NB: tl.constexpr, PAIR: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr,
        R2: tl.constexpr, R3: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """`_spc_weight_grad_tap` as one product: the output gradients of the NB - FIRST branches that
    reach the tap side by side (BLOCK_O columns each; 3 branches take the columns of 4, the last
    masked), so each shifted input tile meets them all in one `tl.dot` that many times wider,
    instead of one narrow product per branch.

    PAIR (stride 1): also the tap one column to the right, (dh, dw + 1), from the same input tile.
    Its products pair input pixel q + (dh, dw) with the output gradient of pixel q - (0, dil_w),
    which is the pair the tap (dh, dw + 1) sums at output pixel q - (0, dil_w). So each input tile
    is read once for two taps; q runs over dil_w more columns than the output has, and each tap's
    output pixels are masked to the output."""
    SPAN: tl.constexpr = 1 if NB - FIRST == 1 else 2 if NB - FIRST == 2 else 4
    j = tl.arange(0, SPAN * BLOCK_O)
    b = FIRST + j // BLOCK_O  # each column's branch
    o = o0 + j % BLOCK_O  # and its output channel in the group
    col_ok = (b < NB) & (o < C_OUT)
    cols = b * (G * C_OUT * y_c) + (g * C_OUT + o) * y_c  # the branches' output gradients are concatenated
    acc = tl.zeros((BLOCK_R, SPAN * BLOCK_O), dtype=tl.float32)
    acc_next = tl.zeros((BLOCK_R, SPAN * BLOCK_O) if PAIR else (1, 1), dtype=tl.float32)
    W_q = W_out + dil_w if PAIR else W_out  # the columns q runs over
    n_tiles = N * tl.cdiv(H_out, BLOCK_H) * tl.cdiv(W_q, BLOCK_W)
    for t in range(chunk * TILES_PER_CHUNK, tl.minimum((chunk + 1) * TILES_PER_CHUNK, n_tiles)):
        xt, n, oh, ow, q_ok = _shifted_input_tile(x_ptr, t, dh, dw, g, r, r_ok, H, W, H_out, W_q, x_n, x_h, x_w,
                                                  x_c, stride_h, stride_w, dil_h, dil_w, C_IN, BLOCK_H, BLOCK_W)
        pix = n * y_n + oh * y_h + ow * y_w
        p_ok = q_ok
        if PAIR:
            p_ok = q_ok & (ow < W_out)
        gv = tl.load(gy_ptr + pix[:, None] + cols[None, :], mask=p_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(xt, gv, acc, input_precision=PRECISION)
        if PAIR:
            gv = tl.load(gy_ptr + (pix - dil_w * y_w)[:, None] + cols[None, :],
                         mask=(q_ok & (ow >= dil_w))[:, None] & col_ok[None, :], other=0.0)
            acc_next = tl.dot(xt, gv, acc_next, input_precision=PRECISION)
    _store_stacked_parts(p0_ptr, p1_ptr, p2_ptr, p3_ptr, acc, dh, dw, chunk, g, r, r_ok, o, col_ok, b, G,
                         FIRST, R0, R1, R2, R3, C_IN, C_OUT)
    if PAIR:
        _store_stacked_parts(p0_ptr, p1_ptr, p2_ptr, p3_ptr, acc_next, dh, dw + 1, chunk, g, r, r_ok, o, col_ok, b, G,
                             FIRST, R0, R1, R2, R3, C_IN, C_OUT)


@triton.jit
def _spc_weight_grad_case(
        x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o0, o, o_ok,
        N, H, W, H_out, W_out, x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w,
        G, TILES_PER_CHUNK,
        FIRST: tl.constexpr, NB: tl.constexpr, STACKED: tl.constexpr, PAIR: tl.constexpr, R0: tl.constexpr,
        R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_O: tl.constexpr,
):
    """One tap's (PAIR: two adjacent taps') partial weight gradients for the branches from FIRST on,
    stacked into one product or one product per branch (`Config.stack_branches`; pairs stack)."""
    if STACKED or PAIR:
        _spc_weight_grad_stacked_tap(
            x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o0, N, H, W, H_out, W_out,
            x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w, G, TILES_PER_CHUNK,
            FIRST, NB, PAIR, R0, R1, R2, R3, C_IN, C_OUT, PRECISION, BLOCK_H, BLOCK_W, BLOCK_R, BLOCK_O)
    else:
        _spc_weight_grad_tap(
            x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o, o_ok, N, H, W, H_out, W_out,
            x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w, G, TILES_PER_CHUNK,
            FIRST, R0, R1, R2, R3, C_IN, C_OUT, PRECISION, BLOCK_H, BLOCK_W, BLOCK_R, BLOCK_O)


@triton.jit(do_not_specialize=['N', 'H', 'W', 'H_out', 'W_out', 'TILES_PER_CHUNK'])
def _spc_weight_grad_mma_kernel(
        x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr,
        N, H, W, H_out, W_out,
        x_n, x_h, x_w, x_c,
        y_n, y_h, y_w, y_c,
        stride_h, stride_w, dil_h, dil_w,
        G, TILES_PER_CHUNK,
        R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R_MAX: tl.constexpr,
        NB: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr, PRECISION: tl.constexpr, STACKED: tl.constexpr,
        PAIR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_O: tl.constexpr,
):
    """The weight gradients of `_spc_mma_kernel`, as partial sums per chunk of pixel tiles (added
    afterwards in fp32): part_b[chunk, tap, g, i, o] = sum over the chunk's output pixels p of
    x[p*stride + (dh, dw)*dil, g*C_IN + i] * gy[p, b*G*C_OUT + g*C_OUT + o]. Each program: one
    tap offset of the largest kernel (PAIR, at stride 1: two adjacent ones of a row, the last of an
    odd row beyond the kernel and never stored), one group (and block of its channels), one chunk;
    those of the NB branches whose kernels reach the tap share its input tiles."""
    tap = tl.program_id(0)  # fastest: the programs running together read the same chunk, once from memory
    pid_c = tl.program_id(1)
    chunk = tl.program_id(2)
    if PAIR:
        dh = tap // (R_MAX + 1) - R_MAX
        dw = tap % (R_MAX + 1) * 2 - R_MAX
        ring = tl.maximum(tl.abs(dh), tl.minimum(tl.abs(dw), tl.abs(dw + 1)))  # the nearer tap's
    else:
        dh = tap // (2 * R_MAX + 1) - R_MAX
        dw = tap % (2 * R_MAX + 1) - R_MAX
        ring = tl.maximum(tl.abs(dh), tl.abs(dw))
    n_rblocks = tl.cdiv(C_IN, BLOCK_R)
    n_oblocks = tl.cdiv(C_OUT, BLOCK_O)
    g = pid_c // (n_rblocks * n_oblocks)
    r = ((pid_c // n_oblocks) % n_rblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    o0 = (pid_c % n_oblocks) * BLOCK_O
    o = o0 + tl.arange(0, BLOCK_O)
    r_ok = r < C_IN
    o_ok = o < C_OUT
    # which branches reach the tap is one scalar test per program; each case is a loop of its own
    if ring <= R0:
        _spc_weight_grad_case(
            x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o0, o, o_ok, N, H, W, H_out,
            W_out, x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w, G, TILES_PER_CHUNK,
            0, NB, STACKED, PAIR, R0, R1, R2, R3, C_IN, C_OUT, PRECISION, BLOCK_H, BLOCK_W, BLOCK_R, BLOCK_O)
    elif ring <= R1:
        _spc_weight_grad_case(
            x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o0, o, o_ok, N, H, W, H_out,
            W_out, x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w, G, TILES_PER_CHUNK,
            1, NB, STACKED, PAIR, R0, R1, R2, R3, C_IN, C_OUT, PRECISION, BLOCK_H, BLOCK_W, BLOCK_R, BLOCK_O)
    elif ring <= R2:
        _spc_weight_grad_case(
            x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o0, o, o_ok, N, H, W, H_out,
            W_out, x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w, G, TILES_PER_CHUNK,
            2, NB, STACKED, PAIR, R0, R1, R2, R3, C_IN, C_OUT, PRECISION, BLOCK_H, BLOCK_W, BLOCK_R, BLOCK_O)
    else:
        _spc_weight_grad_case(
            x_ptr, gy_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, dh, dw, chunk, g, r, r_ok, o0, o, o_ok, N, H, W, H_out,
            W_out, x_n, x_h, x_w, x_c, y_n, y_h, y_w, y_c, stride_h, stride_w, dil_h, dil_w, G, TILES_PER_CHUNK,
            3, NB, STACKED, PAIR, R0, R1, R2, R3, C_IN, C_OUT, PRECISION, BLOCK_H, BLOCK_W, BLOCK_R, BLOCK_O)


@triton.jit
def _branch_tiles(w_ptr, t_ptr, pid, G, w_o, w_i, w_h, w_w, K: tl.constexpr, M: tl.constexpr, C_IN: tl.constexpr,
                  C_OUT: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr):
    """One block of a branch's kernel tiles (`_weight_pointers`' layout) from its grouped weight of
    strides (w_o, w_i, w_h, w_w): M adjacent groups merged block-diagonally into groups of C_IN
    inputs and C_OUT outputs, cast to the tiles' dtype."""
    INS: tl.constexpr = C_IN // M
    OUTS: tl.constexpr = C_OUT // M
    RED: tl.constexpr = C_OUT if TRANSPOSED else C_IN
    WRITTEN: tl.constexpr = C_IN if TRANSPOSED else C_OUT
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K * K * G * RED * WRITTEN
    written, rest = offs % WRITTEN, offs // WRITTEN
    red, rest = rest % RED, rest // RED
    g, tap = rest % G, rest // G
    if TRANSPOSED:  # reduced: (block, output), written: (block, input)
        block, o, block_in, i = red // OUTS, red % OUTS, written // INS, written % INS
    else:
        block, i, block_in, o = red // INS, red % INS, written // OUTS, written % OUTS
    src = ((g * M + block) * OUTS + o) * w_o + i * w_i + (tap // K) * w_h + (tap % K) * w_w
    value = tl.load(w_ptr + src, mask=ok & (block == block_in), other=0.0)
    tl.store(t_ptr + offs, value.to(t_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _tiles_kernel(
        w0_ptr, w1_ptr, w2_ptr, w3_ptr, t0_ptr, t1_ptr, t2_ptr, t3_ptr,
        w0_o, w0_i, w0_h, w0_w, w1_o, w1_i, w1_h, w1_w, w2_o, w2_i, w2_h, w2_w, w3_o, w3_i, w3_h, w3_w,
        G,
        K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
        M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
        C_IN: tl.constexpr, C_OUT: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Every branch's kernel tiles in one launch: program (block, branch)."""
    pid, branch = tl.program_id(0), tl.program_id(1)
    if branch == 0:
        _branch_tiles(w0_ptr, t0_ptr, pid, G, w0_o, w0_i, w0_h, w0_w, K0, M0, C_IN, C_OUT, TRANSPOSED, BLOCK)
    elif branch == 1:
        _branch_tiles(w1_ptr, t1_ptr, pid, G, w1_o, w1_i, w1_h, w1_w, K1, M1, C_IN, C_OUT, TRANSPOSED, BLOCK)
    elif branch == 2:
        _branch_tiles(w2_ptr, t2_ptr, pid, G, w2_o, w2_i, w2_h, w2_w, K2, M2, C_IN, C_OUT, TRANSPOSED, BLOCK)
    else:
        _branch_tiles(w3_ptr, t3_ptr, pid, G, w3_o, w3_i, w3_h, w3_w, K3, M3, C_IN, C_OUT, TRANSPOSED, BLOCK)


@triton.jit
def _branch_weight_grad(p_ptr, g_ptr, pid, G, CHUNKS, K: tl.constexpr, M: tl.constexpr, C_IN: tl.constexpr,
                        C_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """One block of a branch's grouped weight gradient (O, I, K, K) contiguous: its diagonal blocks
    of the merged weight's fp32 partial sums (chunks, K, K, G, C_IN, C_OUT), summed over chunks.
    Walked in the partial sums' order (outputs fastest), which every chunk reads, not the gradient's,
    which is written once."""
    INS: tl.constexpr = C_IN // M
    OUTS: tl.constexpr = C_OUT // M
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K * K * G * C_IN * OUTS
    o, rest = offs % OUTS, offs // OUTS
    i, rest = rest % INS, rest // INS
    block, rest = rest % M, rest // M
    g, tap = rest % G, rest // G
    src = ((tap * G + g) * C_IN + block * INS + i) * C_OUT + block * OUTS + o
    chunk_size = K * K * G * C_IN * C_OUT
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for chunk in range(CHUNKS):
        total += tl.load(p_ptr + chunk * chunk_size + src, mask=ok, other=0.0)
    dst = (((g * M + block) * OUTS + o) * INS + i) * (K * K) + tap
    tl.store(g_ptr + dst, total.to(g_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _weight_grads_kernel(
        p0_ptr, p1_ptr, p2_ptr, p3_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr, G, CHUNKS,
        K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
        M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
        C_IN: tl.constexpr, C_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Every branch's grouped weight gradient in one launch: program (block, branch)."""
    pid, branch = tl.program_id(0), tl.program_id(1)
    if branch == 0:
        _branch_weight_grad(p0_ptr, g0_ptr, pid, G, CHUNKS, K0, M0, C_IN, C_OUT, BLOCK)
    elif branch == 1:
        _branch_weight_grad(p1_ptr, g1_ptr, pid, G, CHUNKS, K1, M1, C_IN, C_OUT, BLOCK)
    elif branch == 2:
        _branch_weight_grad(p2_ptr, g2_ptr, pid, G, CHUNKS, K2, M2, C_IN, C_OUT, BLOCK)
    else:
        _branch_weight_grad(p3_ptr, g3_ptr, pid, G, CHUNKS, K3, M3, C_IN, C_OUT, BLOCK)


def fusable(
        in_chs: int,
        out_chs: Sequence[int],
        kernel_sizes: Sequence[int],
        groups: Sequence[int],
        strides: Sequence[Sequence[int]],
        paddings: Sequence[Sequence[int]],
        dilations: Sequence[Sequence[int]],
) -> bool:
    """Whether convs of the same `in_chs`-channel input, with these (merged) groups, run together in
    `spc_conv`: 2 to MAX_BRANCHES of them, the same input and output channels per group, stride and
    dilation, square odd kernels in ascending order, each padded to keep its centre."""
    n = len(kernel_sizes)
    if not 2 <= n <= MAX_BRANCHES or len({*groups}) != 1 or len({*out_chs}) != 1:
        return False
    if len({tuple(s) for s in strides}) != 1 or len({tuple(d) for d in dilations}) != 1:
        return False
    dil = tuple(dilations[0])
    centred = all(k % 2 == 1 and tuple(p) == tuple(d * (k - 1) // 2 for d in dil)
                  for k, p in zip(kernel_sizes, paddings))
    return centred and in_chs % groups[0] == 0 and list(kernel_sizes) == sorted(kernel_sizes)


def _radii(kernel_sizes: Sequence[int]) -> List[int]:
    """Each branch's kernel radius, -1 for the kernels' weight slots no branch fills."""
    return [k // 2 for k in kernel_sizes] + [-1] * (MAX_BRANCHES - len(kernel_sizes))


def _weight_pointers(weights: Sequence[torch.Tensor], groups: int, transposed: bool) -> List[torch.Tensor]:
    """Each (merged) branch weight as the kernels read it: (KH, KW, G, reduced, written) contiguous
    (transposed: a group's outputs are reduced, its inputs written)."""
    tiles = []
    for w in weights:
        out_chs, in_per_group, k_h, k_w = w.shape
        w = w.reshape(groups, out_chs // groups, in_per_group, k_h, k_w)
        tiles.append((w.permute(3, 4, 0, 1, 2) if transposed else w.permute(3, 4, 0, 2, 1)).contiguous())
    return tiles


PREP_BLOCK = 1024  # elements per program of the weight-preparation kernels


def _pad(values: list) -> list:
    """`values` padded to the kernels' MAX_BRANCHES slots with its first (never read)."""
    return values + values[:1] * (MAX_BRANCHES - len(values))


def branch_tiles(weights, merges, merged, dtype, transposed) -> List[torch.Tensor]:
    """Each branch's grouped weight as the kernels read it, in one launch of `_tiles_kernel`:
    `_weight_pointers` of the weights merged (`merges[i]` groups of branch i per merged group, into
    `merged` groups; `_branch_forms.block_diagonal_weight`) and cast to `dtype`. Training builds
    them every step, inference once (`BranchConv2d.kept_weight`)."""
    c_in = weights[0].shape[1] * merges[0]  # inputs and outputs per merged group, alike in every branch
    c_out = weights[0].shape[0] // merged
    red, written = (c_out, c_in) if transposed else (c_in, c_out)
    tiles = [torch.empty((w.shape[-2], w.shape[-1], merged, red, written), dtype=dtype, device=w.device)
             for w in weights]
    kernels, merges = _pad([w.shape[-1] for w in weights]), _pad(list(merges))
    grid = (_cdiv(max(t.numel() for t in tiles), PREP_BLOCK), len(weights))
    _tiles_kernel[grid](
        *_pad(list(weights)), *_pad(tiles), *(v for w in _pad(list(weights)) for v in w.stride()), merged,
        K0=kernels[0], K1=kernels[1], K2=kernels[2], K3=kernels[3], M0=merges[0], M1=merges[1], M2=merges[2],
        M3=merges[3], C_IN=c_in, C_OUT=c_out, TRANSPOSED=transposed, BLOCK=PREP_BLOCK, **FMA)
    return tiles


def _branch_weight_grads(parts, weights, merges) -> List[torch.Tensor]:
    """Every branch's grouped weight gradient from the weight-gradient kernel's partial sums
    (`_weight_grad_parts`): the diagonal blocks of each merged weight's, summed over chunks, in one
    launch of `_weight_grads_kernel`."""
    chunks, _, _, merged, c_in, c_out = parts[0].shape
    grads = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    kernels, merges = _pad([w.shape[-1] for w in weights]), _pad(list(merges))
    grid = (_cdiv(max(g.numel() for g in grads), PREP_BLOCK), len(weights))
    _weight_grads_kernel[grid](
        *_pad(list(parts)), *_pad(grads), merged, chunks, K0=kernels[0], K1=kernels[1], K2=kernels[2],
        K3=kernels[3], M0=merges[0], M1=merges[1], M2=merges[2], M3=merges[3], C_IN=c_in, C_OUT=c_out,
        BLOCK=PREP_BLOCK, **FMA)
    return grads


def _launch(src, weights, dst, stride, dilation, groups, transposed, config=None):
    """dst = the branches of src, concatenated (forward), or their input gradient from their
    concatenated output gradient src (transposed; stride 1), on `config`'s tile (default
    `mma_config_for`'s)."""
    return _launch_tiles(src, _weight_pointers(weights, groups, transposed), dst, stride, dilation, transposed, config)


def _launch_tiles(src, tiles, dst, stride, dilation, transposed, config=None):
    """`_launch` on the weights as the kernels read them (`_weight_pointers`, `branch_tiles`)."""
    _, _, groups, c_red, c_out = tiles[0].shape
    config = config or mma_config_for(c_red, c_out)
    radii = _radii([t.shape[0] for t in tiles])
    n, _, h_dst, w_dst = dst.shape
    x = dst if transposed else src  # the conv's input and output sizes
    y = src if transposed else dst
    if config.tile_w:  # tiles of block_p // tile_w rows x tile_w columns (`_fused_pixels`)
        pixel_tiles = n * _cdiv(h_dst, config.block_p // config.tile_w) * _cdiv(w_dst, config.tile_w)
    else:
        pixel_tiles = _cdiv(n * h_dst * w_dst, config.block_p)
    grid = (pixel_tiles, groups * _cdiv(c_out, config.block_o))
    s, d = src.stride(), dst.stride()
    kernel = _spc_grad_input_mma_kernel if transposed else _spc_mma_kernel
    kernel[grid](
        src, *_pad(list(tiles)), dst, n, x.shape[2], x.shape[3], y.shape[2],
        y.shape[3], s[0], s[2], s[3], s[1], d[0], d[2], d[3], d[1], stride[0], stride[1], dilation[0], dilation[1],
        groups, R0=radii[0], R1=radii[1], R2=radii[2], R3=radii[3], R_MAX=max(radii), C_RED=c_red, C_OUT=c_out,
        PRECISION=_precision(src), BLOCK_P=config.block_p, BLOCK_R=config.block_r, BLOCK_O=config.block_o,
        TILE_W=config.tile_w, num_warps=config.num_warps, num_stages=config.num_stages, **FMA)
    return dst


def _launch_weight_grad(x, grad, weights, stride, dilation, groups, config=None) -> List[torch.Tensor]:
    """Each (merged) branch's weight gradient, from the branches' concatenated output gradient."""
    outs, ins = weights[0].shape[0] // groups, weights[0].shape[1]
    parts = _weight_grad_parts(x, grad, [w.shape[-1] for w in weights], groups, ins, outs, stride, dilation, config)
    return [weight_grad_of_part(part, w) for part, w in zip(parts, weights)]


def _weight_grad_parts(x, grad, kernel_sizes, groups, ins, outs, stride, dilation, config=None) -> List[torch.Tensor]:
    """Each branch's weight gradient as fp32 partial sums per chunk of pixels, (chunks, KH, KW,
    groups, ins, outs), by `_spc_weight_grad_mma_kernel` on `config`'s tile (default
    `mma_config_for`'s); groups, ins and outs per (merged) group."""
    config = config or mma_config_for(ins, outs)
    radii = _radii(kernel_sizes)
    k = 2 * max(radii) + 1
    pair = config.pair_taps and tuple(stride) == (1, 1)
    taps = k * _cdiv(k, 2) if pair else k * k  # programs per block and chunk: taps, or pairs of a row
    blocks = groups * _cdiv(ins, config.block_r) * _cdiv(outs, config.block_o)
    n, c, h_out, w_out = grad.shape  # pairs run over dilation[1] more columns (`_spc_weight_grad_stacked_tap`)
    block_h, block_w, tiles_per_chunk, chunks = weight_grad_chunks(
        x.device, (n, c, h_out, w_out + dilation[1] * pair), config.block_p, blocks * taps)
    parts = [torch.empty((chunks, k, k, groups, ins, outs), dtype=torch.float32, device=x.device) for k in kernel_sizes]
    s, d = x.stride(), grad.stride()
    # taps vary fastest: the programs in flight share a chunk of x and of the output gradients
    _spc_weight_grad_mma_kernel[(taps, blocks, chunks)](
        x, grad, *_pad(parts), grad.shape[0], x.shape[2], x.shape[3],
        grad.shape[2], grad.shape[3], s[0], s[2], s[3], s[1], d[0], d[2], d[3], d[1],
        stride[0], stride[1], dilation[0], dilation[1], groups, tiles_per_chunk,
        R0=radii[0], R1=radii[1], R2=radii[2], R3=radii[3], R_MAX=max(radii), NB=len(kernel_sizes), C_IN=ins,
        C_OUT=outs, PRECISION=_precision(x), STACKED=config.stack_branches, PAIR=pair, BLOCK_H=block_h,
        BLOCK_W=block_w, BLOCK_R=config.block_r, BLOCK_O=config.block_o,
        num_warps=config.num_warps, num_stages=config.num_stages, **FMA)
    return parts


def _paddings(weights: Sequence[torch.Tensor], dilation: Sequence[int]) -> List[List[int]]:
    return [[d * (w.shape[-1] // 2) for d in dilation] for w in weights]


def _out_shape(x, weights, stride, dilation):
    k = weights[0].shape[-1]
    pad = _paddings(weights[:1], dilation)[0]
    return (x.shape[0], sum(w.shape[0] for w in weights), _out_size(x.shape[2], k, stride[0], pad[0], dilation[0]),
            _out_size(x.shape[3], k, stride[1], pad[1], dilation[1]))


@torch.library.custom_op('timm_epsanet::spc_conv', mutates_args=())
def _spc_op(x: torch.Tensor, weights: List[torch.Tensor], stride: List[int], dilation: List[int],
            groups: int) -> torch.Tensor:
    _check_device(x)
    y = _empty_like_layout(x, _out_shape(x, weights, stride, dilation), x.dtype)
    return _launch(x, weights, y, stride, dilation, groups, transposed=False)


@_spc_op.register_fake
def _(x, weights, stride, dilation, groups):
    return _empty_like_layout(x, _out_shape(x, weights, stride, dilation), x.dtype)


@torch.library.custom_op('timm_epsanet::spc_conv_grad_input', mutates_args=())
def _spc_grad_input_op(grad: torch.Tensor, weights: List[torch.Tensor], x: torch.Tensor, dilation: List[int],
                       groups: int) -> torch.Tensor:
    _check_device(grad)
    return _launch(grad, weights, _empty_like_layout(x, x.shape, grad.dtype), [1, 1], dilation, groups, transposed=True)


@_spc_grad_input_op.register_fake
def _(grad, weights, x, dilation, groups):
    return _empty_like_layout(x, x.shape, grad.dtype)


@torch.library.custom_op('timm_epsanet::spc_conv_grad_weight', mutates_args=())
def _spc_grad_weight_op(x: torch.Tensor, grad: torch.Tensor, weights: List[torch.Tensor], stride: List[int],
                        dilation: List[int], groups: int) -> List[torch.Tensor]:
    _check_device(x)
    return _launch_weight_grad(x, grad, weights, stride, dilation, groups)


@_spc_grad_weight_op.register_fake
def _(x, grad, weights, stride, dilation, groups):
    return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]


def _setup_context(ctx, inputs, output):
    x, weights, stride, dilation, groups = inputs
    ctx.save_for_backward(x, *weights)
    ctx.conv_args = (stride, dilation, groups)


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    stride, dilation, groups = ctx.conv_args
    paddings = _paddings(weights, dilation)
    grads = grad.split([w.shape[0] for w in weights], dim=1)  # each branch's output gradient
    grad_x = None
    if ctx.needs_input_grad[0]:
        if max(stride) == 1:
            grad_x = _spc_grad_input_op(grad, weights, x, dilation, groups)
        else:  # each branch by phases of the stride, which the fused walk cannot skip to
            grad_x = _grad_input_op(grads[0], weights[0], x, stride, paddings[0], dilation, groups, True)
            for g, w, p in zip(grads[1:], weights[1:], paddings[1:]):
                grad_x = grad_x + _grad_input_op(g, w, x, stride, p, dilation, groups, True)
    grad_ws = _spc_grad_weight_op(x, grad, weights, stride, dilation, groups) if ctx.needs_input_grad[1] else None
    return grad_x, grad_ws, None, None, None


_spc_op.register_autograd(_backward, setup_context=_setup_context)


def spc_conv(
        x: torch.Tensor,
        weights: Sequence[torch.Tensor],
        stride: Sequence[int],
        dilation: Sequence[int],
        groups: int,
) -> torch.Tensor:
    """`torch.cat([F.conv2d(x, w, None, stride, dilation * (k // 2), dilation, groups) for w in weights], 1)`
    (k: w's kernel size) by the fused tensor-core kernels, differentiable in x and the weights; the output
    in x's dtype and memory layout. The convs must be `fusable`; each group's channels are padded to
    `tl.dot`'s 16, so merge narrower groups first (`_branch_forms.block_diagonal_weight`)."""
    weights = list(weights)
    if x.dim() != 4 or any(w.dim() != 4 for w in weights):
        raise ValueError(f'spc_conv takes 4D x and weights, got shapes {tuple(x.shape)} and '
                         f'{[tuple(w.shape) for w in weights]}')
    ok = fusable(x.shape[1], [w.shape[0] for w in weights], [w.shape[-1] for w in weights], [groups] * len(weights),
                 [stride] * len(weights), _paddings(weights, dilation), [dilation] * len(weights))
    if not ok or any(w.shape[-2] != w.shape[-1] or x.shape[1] != w.shape[1] * groups for w in weights):
        raise ValueError(f'spc_conv: x {tuple(x.shape)} and weights {[tuple(w.shape) for w in weights]} are not '
                         f'2-{MAX_BRANCHES} "same" convs of {groups} groups with ascending odd kernels')
    if any(w.dtype != x.dtype for w in weights):
        raise ValueError(f'spc_conv: x is {x.dtype} but the weights are {[w.dtype for w in weights]}; cast them alike')
    return _spc_op(x, weights, list(stride), list(dilation), groups)


class _SpcConvGrouped(torch.autograd.Function):
    """`spc_conv` of the branches' grouped weights, merged where they are used: the forward's
    kernel tiles (kept by inference, or built by `spc_conv_grouped`), the input gradient's
    transposed ones, and the grouped weights' gradients read off the weight-gradient kernel's
    partial sums, each in one launch for every branch. Autograd sees one node, with no merge,
    cast, layout or gradient-reshaping op per branch around it. A branch alone runs
    `_triton_branch`'s tensor-core kernels, which take the same tiles and write the same partial
    sums; so does each branch's input gradient at stride > 1 (its phased kernel)."""

    @staticmethod
    def forward(ctx, x, tiles, merges, stride, dilation, *weights):
        y = _empty_like_layout(x, _out_shape(x, weights, stride, dilation), x.dtype)
        if len(weights) == 1:
            _launch_conv_tiles(x, tiles[0], y, stride, _paddings(weights, dilation)[0], dilation, transposed=False,
                               tensor_cores=True)
        else:
            _launch_tiles(x, tiles, y, stride, dilation, transposed=False)
        ctx.save_for_backward(x, *weights)
        ctx.conv_args = (tiles[0].shape[2], merges, stride, dilation)
        return y

    @staticmethod
    @once_differentiable  # the kernels' gradients are not differentiable: double backward raises
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        merged, merges, stride, dilation = ctx.conv_args
        paddings = _paddings(weights, dilation)
        # the kernels' layout, x's: an NCHW caller's output gradient comes back NCHW
        grad = in_layout(grad, layout_of(x))
        grad_x = None
        if ctx.needs_input_grad[0]:
            tiles = branch_tiles(weights, merges, merged, x.dtype, transposed=True)
            if len(weights) > 1 and max(stride) == 1:
                grad_x = _launch_tiles(grad, tiles, _empty_like_layout(x, x.shape, grad.dtype), [1, 1], dilation,
                                       transposed=True)
            else:  # each branch alone (at stride > 1 by phases of the stride, which the fused walk cannot skip to)
                grads = grad.split([w.shape[0] for w in weights], dim=1)
                for g, tile, padding in zip(grads, tiles, paddings):
                    share = _launch_conv_tiles(g, tile, _empty_like_layout(x, x.shape, grad.dtype), stride, padding,
                                               dilation, transposed=True, tensor_cores=True)
                    grad_x = share if grad_x is None else grad_x.add_(share)
        grad_ws = [None] * len(weights)
        if any(ctx.needs_input_grad[5:]):
            ins, outs = x.shape[1] // merged, weights[0].shape[0] // merged
            if len(weights) == 1:
                k = weights[0].shape[-1]
                parts = [_weight_grad_part(x, grad, (k, k), merged, ins, outs, stride, paddings[0], dilation,
                                           tensor_cores=True)]
            else:
                parts = _weight_grad_parts(x, grad, [w.shape[-1] for w in weights], merged, ins, outs, stride,
                                           dilation)
            grad_ws = _branch_weight_grads(parts, weights, merges)
        return (grad_x, None, None, None, None, *grad_ws)


def spc_conv_grouped(
        x: torch.Tensor,
        weights: Sequence[torch.Tensor],
        merges: Sequence[int],
        merged_groups: int,
        stride: Sequence[int],
        dilation: Sequence[int],
        tiles: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """`spc_conv` of grouped convs whose groups become `merged_groups` once `merges[i]` adjacent
    groups of branch i are merged; the weights as the branches hold them (any float dtype; cast to
    x's), differentiable in x and the weights. `tiles`: the forward's kernel tiles if already built
    (`branch_tiles`, x's dtype), as inference keeps them. One branch is its "same" conv on tensor cores.

    In plain eager mode (`plain_eager`) the kernels run from one autograd node that merges the weights
    itself; elsewhere the merged weights go through the custom ops (`spc_conv`, or `branch_conv` for
    one branch) that compile, export and fake tensors need. The same function either way."""
    weights, merges = list(weights), list(merges)
    if not plain_eager(x):
        merged = [block_diagonal_weight(w.to(x.dtype), merged_groups * m, m) if m > 1 else w.to(x.dtype)
                  for w, m in zip(weights, merges)]
        if len(merged) == 1:
            return branch_conv(x, merged[0], stride, _paddings(merged, dilation)[0], dilation, merged_groups,
                               tensor_cores=True)
        return spc_conv(x, merged, stride, dilation, merged_groups)
    _check_device(x)
    if tiles is None:
        tiles = branch_tiles(weights, merges, merged_groups, x.dtype, transposed=False)
    return _SpcConvGrouped.apply(x, list(tiles), merges, list(stride), list(dilation), *weights)
