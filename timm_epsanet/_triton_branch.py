""" Triton kernels for PSA branches: grouped convs with few outputs per group.

cuDNN runs grouped convs with large kernels and 1-8 outputs per group far below the GPU's rate,
and tensor-core tiles (`tl.dot` wants 16 or more on each side) do not fit such groups. The first
kernels compute such a conv directly on CUDA cores: each program holds a tile of pixels x
channels of a few groups, and accumulates in fp32 registers, tap by tap, with plain multiply-adds.

  * forward and input gradient: one kernel (`_conv_kernel`). The input gradient is the same sum
    read the other way: each input pixel gathers the output gradients of the outputs whose
    window covered it, with the weight group-transposed (a group's outputs become its reduction
    channels). At stride > 1 each program takes the pixels of one phase (row and column
    remainders mod the stride), which only every stride-th tap reaches: it runs those taps alone.
  * weight gradient (`_weight_grad_kernel`): each program sums the products of one tap over a
    chunk of pixel tiles (rows of one image, so a pixel's coordinates are shifts, not divisions);
    the chunks' partial sums are added afterwards in fp32 (deterministic, no atomics).
  * on tensor cores (`_conv_mma_kernel`, `_weight_grad_mma_kernel`): the same sums as tile
    products (`tl.dot`), for groups of 16 or more channels each way, which is what a PSA branch
    becomes when adjacent groups are merged with block-diagonal weights. The merge multiplies the
    MACs, but tensor cores run them many times faster than CUDA cores run plain multiply-adds.

Tensors of any memory layout are read through their strides (channels-last is the fast one:
a group's channels are contiguous). Inputs fp16, bf16 or fp32; fp32 accumulation; outputs in
the input's dtype. The three are registered as custom ops (`timm_epsanet::branch_conv*`) with
fake implementations and autograd, so torch.compile, FX and export see one op per conv.

Private to the package, imported only where a branch runs in the 'triton' or 'triton_mma' form
(`_branch_conv`); needs triton, and a CUDA device (or TRITON_INTERPRET=1, which runs the kernels
on CPU tensors).
"""
import functools
import os
from typing import List, NamedTuple, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _branch_plans
from ._branch_plans import next_pow2

__all__ = ['Config', 'branch_conv', 'config_for', 'mma_config_for']

# given at every launch rather than left to Triton's default: multiply-adds fused into FMAs, as in
# every build measured here. Triton 3.9 warns at each compile that leaves it unset, and 3.10 turns
# the default off, which would split the CUDA-core kernels' FFMAs into twice the instructions.
FMA = dict(enable_fp_fusion=True)


def _interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


@triton.jit
def _source_index(i, tap, stride, pad, dil, size, TRANSPOSED: tl.constexpr):
    """Along one axis: the source index that tap `tap` of destination index `i` reads, and
    whether it exists (inside the source; transposed: the tap lands on a strided output)."""
    if TRANSPOSED:
        t = i + pad - tap * dil
        src = t // stride
        ok = (t >= 0) & (t % stride == 0) & (src < size)
    else:
        src = i * stride - pad + tap * dil
        ok = (src >= 0) & (src < size)
    return src, ok


@triton.jit
def _tile_pixels(t, H_out, W_out, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The output pixels of tile `t` of the weight-gradient kernels, BLOCK_H rows x BLOCK_W columns
    of one image: its image (a scalar), each pixel's row and column, and whether it exists. Only
    the tile is divided (once, a scalar); the pixels' coordinates are shifts and masks."""
    row_blocks = tl.cdiv(H_out, BLOCK_H)
    col_blocks = tl.cdiv(W_out, BLOCK_W)
    n = t // (row_blocks * col_blocks)
    rest = t % (row_blocks * col_blocks)
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    oh = (rest // col_blocks) * BLOCK_H + i // BLOCK_W
    ow = (rest % col_blocks) * BLOCK_W + i % BLOCK_W
    return n.to(tl.int64), oh, ow, (oh < H_out) & (ow < W_out)


@triton.jit
def _dst_pixels(pid_p, N, H_dst, W_dst, stride_h, stride_w, pad_h, pad_w,
                BLOCK_P: tl.constexpr, PHASED: tl.constexpr):
    """The destination pixels of program `pid_p` (image, row, column, exists), and the first tap
    and tap step of each axis. PHASED (a strided input gradient, no dilation): only the pixels of
    phase `program_id(2)`, whose rows and columns leave the same remainders mod the stride, so
    that exactly every stride-th tap lands on an output pixel for all of them; the others are
    skipped instead of masked."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    if PHASED:
        ph = tl.program_id(2) // stride_w
        pw = tl.program_id(2) % stride_w
        rows = tl.cdiv(H_dst - ph, stride_h)
        cols = tl.cdiv(W_dst - pw, stride_w)
        p_ok = p < N * rows * cols
        rows = tl.maximum(rows, 1)
        cols = tl.maximum(cols, 1)
        ow = (p % cols) * stride_w + pw
        oh = ((p // cols) % rows) * stride_h + ph
        n = (p // (cols * rows)).to(tl.int64)
        return n, oh, ow, p_ok, (ph + pad_h) % stride_h, (pw + pad_w) % stride_w, stride_h, stride_w
    else:
        p_ok = p < N * H_dst * W_dst
        ow = p % W_dst
        oh = (p // W_dst) % H_dst
        n = (p // (W_dst * H_dst)).to(tl.int64)
        return n, oh, ow, p_ok, 0, 0, 1, 1


@triton.jit
def _group_block(C_OUT: tl.constexpr, BLOCK_O: tl.constexpr):
    """The group and block of written channels of a tensor-core program (`program_id(1)`): the
    group, the channels, and which of them exist."""
    n_oblocks = tl.cdiv(C_OUT, BLOCK_O)
    o = (tl.program_id(1) % n_oblocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    return tl.program_id(1) // n_oblocks, o, o < C_OUT


# sizes are not specialized on (a batch of 2 compiles what a batch of 128 runs); strides are
@triton.jit(do_not_specialize=['N', 'H_src', 'W_src', 'H_dst', 'W_dst'])
def _conv_kernel(
        src_ptr, w_ptr, dst_ptr,
        N, H_src, W_src, H_dst, W_dst,
        s_n, s_h, s_w, s_c,  # strides of src (elements)
        d_n, d_h, d_w, d_c,  # strides of dst
        KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        G,
        C_RED: tl.constexpr,  # reduction channels per group (forward: inputs; input grad: outputs)
        C_OUT: tl.constexpr,  # channels per group written (forward: outputs; input grad: inputs)
        TRANSPOSED: tl.constexpr,  # False: forward; True: input gradient
        PHASED: tl.constexpr,  # a strided input gradient by phases (`_dst_pixels`)
        BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """dst[p, g*C_OUT + o] = sum over taps and r of src[q, g*C_RED + r] * w[tap, g, r, o], where the
    source pixel q of tap (kh, kw) is p*stride - pad + tap*dil (forward) or (p + pad - tap*dil) / stride
    when that divides (transposed). w: (KH, KW, G, C_RED, C_OUT) contiguous."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_oblocks = tl.cdiv(C_OUT, BLOCK_O)
    g0 = (pid_c // n_oblocks) * BLOCK_G
    o0 = (pid_c % n_oblocks) * BLOCK_O

    n, oh, ow, p_ok, kh0, kw0, kh_step, kw_step = _dst_pixels(
        pid_p, N, H_dst, W_dst, stride_h, stride_w, pad_h, pad_w, BLOCK_P, PHASED)

    c = tl.arange(0, BLOCK_G * BLOCK_R)  # (group in tile, reduction channel) flattened
    g = g0 + c // BLOCK_R
    r_in_block = c % BLOCK_R
    g_ok = g < G
    o = o0 + tl.arange(0, BLOCK_O)
    o_ok = o < C_OUT

    acc = tl.zeros((BLOCK_P, BLOCK_G * BLOCK_R, BLOCK_O), dtype=tl.float32)
    for kh in range(kh0, KH, kh_step):
        ih, h_ok = _source_index(oh, kh, stride_h, pad_h, dil_h, H_src, TRANSPOSED)
        for kw in range(kw0, KW, kw_step):
            iw, w_ok = _source_index(ow, kw, stride_w, pad_w, dil_w, W_src, TRANSPOSED)
            pix_ok = p_ok & h_ok & w_ok
            pix = n * s_n + ih * s_h + iw * s_w
            tap = kh * KW + kw
            for r0 in range(0, C_RED, BLOCK_R):
                r = r0 + r_in_block
                c_ok = g_ok & (r < C_RED)
                xv = tl.load(src_ptr + pix[:, None] + ((g * C_RED + r) * s_c)[None, :],
                             mask=pix_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + ((tap * G + g) * C_RED + r)[:, None] * C_OUT + o[None, :],
                             mask=c_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
                acc += xv[:, :, None] * wv[None, :, :]

    # sum the reduction channels of each group: (P, G*R, O) -> (P*G, R, O) -> (P, G*O)
    acc = tl.sum(tl.reshape(acc, (BLOCK_P * BLOCK_G, BLOCK_R, BLOCK_O)), axis=1)
    acc = tl.reshape(acc, (BLOCK_P, BLOCK_G * BLOCK_O))
    col = tl.arange(0, BLOCK_G * BLOCK_O)
    g_out = g0 + col // BLOCK_O
    o_out = o0 + col % BLOCK_O
    col_ok = (g_out < G) & (o_out < C_OUT)
    dst = dst_ptr + (n * d_n + oh * d_h + ow * d_w)[:, None] + ((g_out * C_OUT + o_out) * d_c)[None, :]
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=p_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=['N', 'H', 'W', 'H_out', 'W_out', 'TILES_PER_CHUNK'])
def _weight_grad_kernel(
        x_ptr, gy_ptr, part_ptr,
        N, H, W, H_out, W_out,
        x_n, x_h, x_w, x_c,
        y_n, y_h, y_w, y_c,
        KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        G, TILES_PER_CHUNK,
        C_IN: tl.constexpr, C_OUT: tl.constexpr,  # per group
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,  # a pixel tile: rows x columns of one image
        BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """part[chunk, tap, g, i, o] = sum over the chunk's output pixels p of
    x[p*stride - pad + tap*dil, g*C_IN + i] * gy[p, g*C_OUT + o]; part: (chunks, KH*KW, G, C_IN, C_OUT).
    A chunk is TILES_PER_CHUNK consecutive tiles of `_tile_pixels`."""
    tap = tl.program_id(0)  # fastest: the programs running together read the same chunk, once from memory
    pid_c = tl.program_id(1)
    chunk = tl.program_id(2)
    kh = tap // KW
    kw = tap % KW
    n_rblocks = tl.cdiv(C_IN, BLOCK_R)
    n_oblocks = tl.cdiv(C_OUT, BLOCK_O)
    g0 = (pid_c // (n_rblocks * n_oblocks)) * BLOCK_G
    r0 = ((pid_c // n_oblocks) % n_rblocks) * BLOCK_R
    o0 = (pid_c % n_oblocks) * BLOCK_O

    c = tl.arange(0, BLOCK_G * BLOCK_R)
    g = g0 + c // BLOCK_R
    r = r0 + c % BLOCK_R
    c_ok = (g < G) & (r < C_IN)
    o = o0 + tl.arange(0, BLOCK_O)
    go_ok = c_ok[:, None] & (o < C_OUT)[None, :]
    y_col = (g * C_OUT)[:, None] + o[None, :]  # (G*R, O): the output gradient each product reads

    n_tiles = N * tl.cdiv(H_out, BLOCK_H) * tl.cdiv(W_out, BLOCK_W)
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_G * BLOCK_R, BLOCK_O), dtype=tl.float32)
    for t in range(chunk * TILES_PER_CHUNK, tl.minimum((chunk + 1) * TILES_PER_CHUNK, n_tiles)):
        n, oh, ow, p_ok = _tile_pixels(t, H_out, W_out, BLOCK_H, BLOCK_W)
        ih, h_ok = _source_index(oh, kh, stride_h, pad_h, dil_h, H, False)
        iw, w_ok = _source_index(ow, kw, stride_w, pad_w, dil_w, W, False)
        x_ok = p_ok & h_ok & w_ok
        xv = tl.load(x_ptr + n * x_n + (ih * x_h + iw * x_w)[:, None] + ((g * C_IN + r) * x_c)[None, :],
                     mask=x_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        gv = tl.load(gy_ptr + n * y_n + (oh * y_h + ow * y_w)[:, None, None] + (y_col * y_c)[None, :, :],
                     mask=p_ok[:, None, None] & go_ok[None, :, :], other=0.0).to(tl.float32)
        acc += xv[:, :, None] * gv

    part = tl.sum(acc, axis=0)  # (G*R, O)
    dst = part_ptr + ((chunk * tl.num_programs(0) + tap) * G + g)[:, None] * (C_IN * C_OUT) \
        + (r * C_OUT)[:, None] + o[None, :]
    tl.store(dst, part, mask=go_ok)


@triton.jit(do_not_specialize=['N', 'H_src', 'W_src', 'H_dst', 'W_dst'])
def _conv_mma_kernel(
        src_ptr, w_ptr, dst_ptr,
        N, H_src, W_src, H_dst, W_dst,
        s_n, s_h, s_w, s_c,
        d_n, d_h, d_w, d_c,
        KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        G,
        C_RED: tl.constexpr, C_OUT: tl.constexpr, TRANSPOSED: tl.constexpr, PHASED: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """`_conv_kernel`'s sum for groups of 16 or more channels each way, on tensor cores: each program
    takes one group and, tap by tap, adds the product of a (pixels x reduction channels) tile of
    src and the tap's (reduction x written channels) weight tile (`tl.dot`, fp32 accumulation)."""
    g, o, o_ok = _group_block(C_OUT, BLOCK_O)
    n, oh, ow, p_ok, kh0, kw0, kh_step, kw_step = _dst_pixels(
        tl.program_id(0), N, H_dst, W_dst, stride_h, stride_w, pad_h, pad_w, BLOCK_P, PHASED)
    r_block = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for kh in range(kh0, KH, kh_step):
        ih, h_ok = _source_index(oh, kh, stride_h, pad_h, dil_h, H_src, TRANSPOSED)
        for kw in range(kw0, KW, kw_step):
            iw, w_ok = _source_index(ow, kw, stride_w, pad_w, dil_w, W_src, TRANSPOSED)
            pix_ok = p_ok & h_ok & w_ok
            pix = n * s_n + ih * s_h + iw * s_w
            tap = kh * KW + kw
            for r0 in range(0, C_RED, BLOCK_R):
                r = r0 + r_block
                r_ok = r < C_RED
                xv = tl.load(src_ptr + pix[:, None] + ((g * C_RED + r) * s_c)[None, :],
                             mask=pix_ok[:, None] & r_ok[None, :], other=0.0)
                wv = tl.load(w_ptr + ((tap * G + g) * C_RED + r)[:, None] * C_OUT + o[None, :],
                             mask=r_ok[:, None] & o_ok[None, :], other=0.0)
                acc = tl.dot(xv, wv, acc, input_precision=PRECISION)

    dst = dst_ptr + (n * d_n + oh * d_h + ow * d_w)[:, None] + ((g * C_OUT + o) * d_c)[None, :]
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


@triton.jit(do_not_specialize=['N', 'H', 'W', 'H_out', 'W_out', 'TILES_PER_CHUNK'])
def _weight_grad_mma_kernel(
        x_ptr, gy_ptr, part_ptr,
        N, H, W, H_out, W_out,
        x_n, x_h, x_w, x_c,
        y_n, y_h, y_w, y_c,
        KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        G, TILES_PER_CHUNK,
        C_IN: tl.constexpr, C_OUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_O: tl.constexpr,
):
    """`_weight_grad_kernel`'s partial sums on tensor cores: per chunk of pixel tiles, BLOCK_T
    adjacent taps of one kernel row and one group, the product of the ((tap, input channel) x
    pixels) and (pixels x output channels) tiles. A program's taps read shifted windows of the
    same pixels (one read from memory, the rest from cache) and share the output gradient's."""
    taps = tl.program_id(0)  # fastest: the programs running together read the same chunk, once from memory
    pid_c = tl.program_id(1)
    chunk = tl.program_id(2)
    kw_blocks = tl.cdiv(KW, BLOCK_T)
    kh = taps // kw_blocks
    n_rblocks = tl.cdiv(C_IN, BLOCK_R)
    n_oblocks = tl.cdiv(C_OUT, BLOCK_O)
    g = pid_c // (n_rblocks * n_oblocks)
    j = tl.arange(0, BLOCK_T * BLOCK_R)  # (tap, input channel) flattened
    kw = (taps % kw_blocks) * BLOCK_T + j // BLOCK_R
    r = ((pid_c // n_oblocks) % n_rblocks) * BLOCK_R + j % BLOCK_R
    j_ok = (kw < KW) & (r < C_IN)
    o = (pid_c % n_oblocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < C_OUT

    n_tiles = N * tl.cdiv(H_out, BLOCK_H) * tl.cdiv(W_out, BLOCK_W)
    acc = tl.zeros((BLOCK_T * BLOCK_R, BLOCK_O), dtype=tl.float32)
    for t in range(chunk * TILES_PER_CHUNK, tl.minimum((chunk + 1) * TILES_PER_CHUNK, n_tiles)):
        n, oh, ow, p_ok = _tile_pixels(t, H_out, W_out, BLOCK_H, BLOCK_W)
        ih, h_ok = _source_index(oh, kh, stride_h, pad_h, dil_h, H, False)
        iw, w_ok = _source_index(ow[:, None], kw[None, :], stride_w, pad_w, dil_w, W, False)
        x_ok = (p_ok & h_ok)[:, None] & w_ok & j_ok[None, :]
        xv = tl.load(x_ptr + n * x_n + (ih * x_h)[:, None] + iw * x_w + ((g * C_IN + r) * x_c)[None, :],
                     mask=x_ok, other=0.0)
        gv = tl.load(gy_ptr + n * y_n + (oh * y_h + ow * y_w)[:, None] + ((g * C_OUT + o) * y_c)[None, :],
                     mask=p_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(xv), gv, acc, input_precision=PRECISION)

    dst = part_ptr + (((chunk * KH + kh) * KW + kw) * G + g)[:, None] * (C_IN * C_OUT) \
        + (r * C_OUT)[:, None] + o[None, :]
    tl.store(dst, acc, mask=j_ok[:, None] & o_ok[None, :])


def _cdiv(a: int, b: int) -> int:
    """`triton.cdiv` in plain Python: that is a constexpr function, whose call from the host costs
    microseconds, and every launch computes several sizes."""
    return -(-a // b)


class Config(NamedTuple):
    """A kernel's tile: pixels x (groups x reduction channels) x written channels, and warps; for
    the tensor-core weight gradient also taps per program (adjacent taps of a kernel row). And the
    depth of the software pipeline Triton builds for the loads that feed `tl.dot` (its default, 3):
    pipelined loads are asynchronous copies straight into shared memory, which bypass the L1 cache,
    so every tap's shifted tile, though it mostly overlaps the previous tap's, is read from L2 again.
    At 1 the loads are plain, waited for, and cached in L1. The fused weight gradient
    (`_triton_spc`) multiplies each shifted input tile by the output gradient of each branch that
    reaches the tap, one narrow product per branch, or (`stack_branches`) by theirs side by side,
    one product as wide as all of them (3 branches as wide as 4); with `pair_taps`, at stride 1,
    each program takes two adjacent taps of a row, stacked, and reads each input tile once for
    both (the second tap's product pairs it with the output gradient one column over). The fused
    forward and input gradient take `block_p` consecutive pixels, or with `tile_w` a tile of
    `block_p // tile_w` rows x `tile_w` columns, whose copies shifted by one tap overlap more
    (for L1, where the loads go through it)."""
    block_p: int
    block_g: int
    block_r: int
    block_o: int
    num_warps: int = 4
    block_t: int = 1
    num_stages: int = 3
    stack_branches: bool = False
    pair_taps: bool = False
    tile_w: int = 0


@functools.lru_cache(maxsize=None)  # a pure function of a few ints, asked at every launch
def config_for(groups: int, c_red: int, c_out: int) -> Config:
    """The tile for a conv of `groups` groups, each reducing `c_red` channels into `c_out`: up to
    16 written channels, 32 (groups x reduction channels), and pixels for an fp32 accumulator of
    about 2K values, 16 to 64 of them (larger tiles spilled registers in ptxas's sm_90 build; at
    the floor of 16 pixels, tiles of many written channels hold up to 8K). A starting point, not
    a measured optimum: benchmarks/triton_tiles.py times its neighbours on a GPU."""
    block_o = min(next_pow2(c_out), 16)
    block_r = min(next_pow2(c_red), max(1, 32 // block_o))
    block_g = min(next_pow2(groups), max(1, 32 // block_r))
    block_p = min(64, max(16, 2048 // (block_g * block_r * block_o)))
    return Config(block_p, block_g, block_r, block_o)


@functools.lru_cache(maxsize=None)
def mma_config_for(c_red: int, c_out: int, kernel_width: int = 1) -> Config:
    """The tile of the tensor-core kernels for one group reducing `c_red` channels into `c_out`:
    16 to 64 of each (`tl.dot` takes 16 or more on every side; narrower groups are masked) and 128
    pixels (64 leave more of each loop's instructions to addressing: benchmarks/triton_sass.py).
    The weight gradient takes 2 or 4 taps of a `kernel_width` row per program, the most that
    leave at most one tap of a row unused (3 and 7: 4; 5 and 9: 2), within 256 (tap, channel)
    rows. A starting point, like `config_for`'s: benchmarks/triton_tiles.py times its neighbours."""
    block_r = min(64, max(16, next_pow2(c_red)))
    block_t = next(t for t in (4, 2, 1) if (kernel_width + 1) % t == 0 and t * block_r <= 256)
    return Config(128, 1, block_r, min(64, max(16, next_pow2(c_out))), block_t=block_t)


def _precision(x: torch.Tensor) -> str:
    # fp32 products exactly, like the grouped conv they replace (tf32 would round the inputs)
    return 'ieee' if x.dtype == torch.float32 else 'tf32'


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _empty_like_layout(x: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of `shape` in x's memory layout (channels-last when x is, else contiguous)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(shape, dtype=dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _check_device(x: torch.Tensor) -> None:
    if _branch_plans.triton_too_old():  # an explicit Triton branch_form: 'auto' never picks them there
        raise RuntimeError(_branch_plans.triton_too_old_message())
    if x.device.type != 'cuda' and not _interpreting():
        raise RuntimeError(f'the Triton PSA branch kernels need a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}')


def _launch_conv(src, weight, dst, groups, stride, padding, dilation, transposed, config=None, tensor_cores=False):
    """dst = the conv of src (forward), or its input gradient from the output gradient src (transposed),
    on `config`'s tile (default `config_for`'s, or `mma_config_for`'s on tensor cores)."""
    out_chs, in_per_group, k_h, k_w = weight.shape
    # (KH, KW, G, reduced, written) contiguous: what one tap of one group multiplies. Transposed,
    # the group's outputs are the reduced channels and its inputs the written ones.
    w_t = weight.reshape(groups, out_chs // groups, in_per_group, k_h, k_w)
    w_t = w_t.permute(3, 4, 0, 1, 2) if transposed else w_t.permute(3, 4, 0, 2, 1)
    return _launch_conv_tiles(src, w_t.contiguous(), dst, stride, padding, dilation, transposed, config, tensor_cores)


def _launch_conv_tiles(src, w_t, dst, stride, padding, dilation, transposed, config=None, tensor_cores=False):
    """`_launch_conv` on the weight as the kernels read it: `w_t`, (KH, KW, G, reduced, written) contiguous."""
    k_h, k_w, groups, c_red, c_out = w_t.shape
    if config is None:
        config = mma_config_for(c_red, c_out) if tensor_cores else config_for(groups, c_red, c_out)
    block_p, block_g, block_r, block_o = config.block_p, config.block_g, config.block_r, config.block_o
    n, _, h_dst, w_dst = dst.shape
    # a strided input gradient by phases of the stride: each program's pixels reached by the same taps
    phased = transposed and max(stride) > 1 and tuple(dilation) == (1, 1)
    phases = stride[0] * stride[1] if phased else 1
    pixels = n * _cdiv(h_dst, stride[0]) * _cdiv(w_dst, stride[1]) if phased else n * h_dst * w_dst
    grid = (_cdiv(pixels, block_p), _cdiv(groups, block_g) * _cdiv(c_out, block_o), phases)
    s, d = src.stride(), dst.stride()
    args = (src, w_t, dst, n, src.shape[2], src.shape[3], h_dst, w_dst,
            s[0], s[2], s[3], s[1], d[0], d[2], d[3], d[1],
            k_h, k_w, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups)
    if tensor_cores:
        _conv_mma_kernel[grid](
            *args, C_RED=c_red, C_OUT=c_out, TRANSPOSED=transposed, PHASED=phased, PRECISION=_precision(src),
            BLOCK_P=block_p, BLOCK_R=block_r, BLOCK_O=block_o, num_warps=config.num_warps,
            num_stages=config.num_stages, **FMA)
    else:
        _conv_kernel[grid](
            *args, C_RED=c_red, C_OUT=c_out, TRANSPOSED=transposed, PHASED=phased,
            BLOCK_P=block_p, BLOCK_G=block_g, BLOCK_R=block_r, BLOCK_O=block_o, num_warps=config.num_warps,
            num_stages=config.num_stages, **FMA)
    return dst


@torch.library.custom_op('timm_epsanet::branch_conv', mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int],
             dilation: List[int], groups: int, tensor_cores: bool) -> torch.Tensor:
    _check_device(x)
    y = _empty_like_layout(x, _conv_out_shape(x, weight, stride, padding, dilation), x.dtype)
    return _launch_conv(x, weight, y, groups, stride, padding, dilation, transposed=False, tensor_cores=tensor_cores)


def _conv_out_shape(x, weight, stride, padding, dilation) -> Tuple[int, int, int, int]:
    k_h, k_w = weight.shape[-2:]
    return (x.shape[0], weight.shape[0], _out_size(x.shape[2], k_h, stride[0], padding[0], dilation[0]),
            _out_size(x.shape[3], k_w, stride[1], padding[1], dilation[1]))


@_conv_op.register_fake
def _(x, weight, stride, padding, dilation, groups, tensor_cores):
    return _empty_like_layout(x, _conv_out_shape(x, weight, stride, padding, dilation), x.dtype)


@torch.library.custom_op('timm_epsanet::branch_conv_grad_input', mutates_args=())
def _grad_input_op(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stride: List[int],
                   padding: List[int], dilation: List[int], groups: int, tensor_cores: bool) -> torch.Tensor:
    _check_device(grad)
    grad_x = _empty_like_layout(x, x.shape, grad.dtype)
    return _launch_conv(grad, weight, grad_x, groups, stride, padding, dilation, transposed=True,
                        tensor_cores=tensor_cores)


@_grad_input_op.register_fake
def _(grad, weight, x, stride, padding, dilation, groups, tensor_cores):
    return _empty_like_layout(x, x.shape, grad.dtype)


@torch.library.custom_op('timm_epsanet::branch_conv_grad_weight', mutates_args=())
def _grad_weight_op(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, stride: List[int],
                    padding: List[int], dilation: List[int], groups: int, tensor_cores: bool) -> torch.Tensor:
    _check_device(x)
    return _launch_weight_grad(x, grad, weight, stride, padding, dilation, groups, tensor_cores=tensor_cores)


def weight_grad_chunks(device: torch.device, grad_shape, block_p: int, programs: int) -> Tuple[int, int, int, int]:
    """How a weight-gradient kernel splits the output pixels: tiles of `block_p` pixels (whole rows
    where they fit, else the fewest columns that hold a row: BLOCK_H x BLOCK_W), and chunks of
    tiles, enough for about 4 programs per multiprocessor (`programs` per chunk), each of 4 tiles
    or more. Returns (BLOCK_H, BLOCK_W, tiles per chunk, chunks)."""
    n, _, h_out, w_out = grad_shape
    block_w = min(next_pow2(w_out), block_p)
    block_h = block_p // block_w
    tiles = n * _cdiv(h_out, block_h) * _cdiv(w_out, block_w)
    sms = 4 if device.type != 'cuda' else torch.cuda.get_device_properties(device).multi_processor_count
    chunks = max(1, min(_cdiv(tiles, 4), _cdiv(4 * sms, programs)))
    tiles_per_chunk = _cdiv(tiles, chunks)
    return block_h, block_w, tiles_per_chunk, _cdiv(tiles, tiles_per_chunk)


def _launch_weight_grad(x, grad, weight, stride, padding, dilation, groups, config=None, tensor_cores=False):
    """The weight gradient of the conv of x, given its output gradient, on `config`'s tile."""
    out_chs, in_per_group, k_h, k_w = weight.shape
    part = _weight_grad_part(x, grad, (k_h, k_w), groups, in_per_group, out_chs // groups, stride, padding, dilation,
                             config, tensor_cores)
    return weight_grad_of_part(part, weight)


def weight_grad_of_part(part: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight`'s gradient, in its shape and dtype, from the partial sums (chunks, KH, KW, groups,
    in_per_group, outs) of a weight-gradient kernel."""
    return part.sum(0).permute(2, 4, 3, 0, 1).reshape(weight.shape).to(weight.dtype).contiguous()


def _weight_grad_part(x, grad, kernel_size, groups, in_per_group, outs, stride, padding, dilation, config=None,
                      tensor_cores=False) -> torch.Tensor:
    """The weight gradient as fp32 partial sums per chunk of pixels, (chunks, KH, KW, groups,
    in_per_group, outs), on `config`'s tile (default `config_for`'s or `mma_config_for`'s)."""
    k_h, k_w = kernel_size
    if config is None:
        config = mma_config_for(in_per_group, outs, k_w) if tensor_cores else config_for(groups, in_per_group, outs)
    block_p, block_g, block_r, block_o = config.block_p, config.block_g, config.block_r, config.block_o
    block_t = config.block_t if tensor_cores else 1
    blocks = _cdiv(groups, block_g) * _cdiv(in_per_group, block_r) * _cdiv(outs, block_o)
    taps = k_h * _cdiv(k_w, block_t)  # programs per chunk and block: one per block_t taps of a row
    block_h, block_w, tiles_per_chunk, chunks = weight_grad_chunks(x.device, grad.shape, block_p, blocks * taps)
    part = torch.empty((chunks, k_h, k_w, groups, in_per_group, outs), dtype=torch.float32, device=x.device)
    s, d = x.stride(), grad.stride()
    # taps vary fastest, so that the programs in flight share a chunk of x and of the output
    # gradient: read from memory once, then from L2 by every tap (chunk-major, each tap would
    # sweep all of x, larger than L2 at training batch sizes, anew)
    grid = (taps, blocks, chunks)
    tensors = (x, grad, part, grad.shape[0], x.shape[2], x.shape[3], grad.shape[2], grad.shape[3],
               s[0], s[2], s[3], s[1], d[0], d[2], d[3], d[1])
    conv = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups, tiles_per_chunk)
    if tensor_cores:
        _weight_grad_mma_kernel[grid](
            *tensors, k_h, k_w, *conv, C_IN=in_per_group, C_OUT=outs, PRECISION=_precision(x),
            BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_O=block_o,
            num_warps=config.num_warps, num_stages=config.num_stages, **FMA)
    else:
        _weight_grad_kernel[grid](
            *tensors, k_w, *conv, C_IN=in_per_group, C_OUT=outs, BLOCK_H=block_h, BLOCK_W=block_w,
            BLOCK_G=block_g, BLOCK_R=block_r, BLOCK_O=block_o, num_warps=config.num_warps,
            num_stages=config.num_stages, **FMA)
    return part


@_grad_weight_op.register_fake
def _(x, grad, weight, stride, padding, dilation, groups, tensor_cores):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation, groups, tensor_cores = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (stride, padding, dilation, groups, tensor_cores)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input_op(grad, weight, x, *ctx.conv_args)
    if ctx.needs_input_grad[1]:
        grad_w = _grad_weight_op(x, grad, weight, *ctx.conv_args)
    return grad_x, grad_w, None, None, None, None, None


_conv_op.register_autograd(_backward, setup_context=_setup_context)


def branch_conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        tensor_cores: bool = False,
) -> torch.Tensor:
    """`F.conv2d(x, weight, None, stride, padding, dilation, groups)` by the Triton kernels,
    differentiable in x and weight; the output in x's dtype and memory layout.

    `tensor_cores`: the `tl.dot` kernels, for groups of 16 or more channels each way (narrower
    groups are padded with zeros, so merge them first: `_branch_forms.block_diagonal_weight`);
    else the CUDA-core kernels, for groups of a few outputs."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f'branch_conv takes 4D x and weight, got shapes {tuple(x.shape)} and {tuple(weight.shape)}')
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f'branch_conv: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not form a conv '
                         f'of {groups} groups')
    if x.dtype != weight.dtype:
        raise ValueError(f'branch_conv: x is {x.dtype} but weight is {weight.dtype}; cast them alike')
    return _conv_op(x, weight, list(stride), list(padding), list(dilation), groups, tensor_cores)
