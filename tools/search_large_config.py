"""Search the EPSANet(Large) configurations for one that reproduces the paper's Table 2 sizes.

The paper gives Large only as PSA groups (32, 32, 32, 32) with wider PSA channels. This counts,
in closed form, the parameters of every ResNet-50/101 EPSANet with kernels (3, 5, 7, 9), a conv1/PSA
input width and a PSA output width of 1x..4x the ResNet width (steps of 1/8), and groups from
{1, 2, ..., 64}^4, keeping those PyTorch can build. It prints the closest ones.

    python tools/search_large_config.py
"""
import itertools

KERNELS = (3, 5, 7, 9)
TARGET = (27.90, 49.59)  # Table 2, M params, Large-50 and Large-101
DEPTHS = ((3, 4, 6, 3), (3, 4, 23, 3))
WIDTH_STEPS = tuple(i / 8 for i in range(8, 33))
GROUP_CHOICES = (1, 2, 4, 8, 16, 32, 64)


def epsanet_params(layers, in_mult, out_mult, groups, kernels=KERNELS, se_reduction=16, num_classes=1000):
    """Parameter count of an EPSANet; None if some stage's channels do not divide by the groups."""
    total = 3 * 64 * 7 * 7 + 2 * 64  # stem conv + bn
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        width_in, width_out = int(planes * in_mult), int(planes * out_mult)
        split = width_out // 4
        if width_out % 4 or any(width_in % g or split % g for g in groups):
            return None
        squeezed = max(1, split // se_reduction)
        psa = sum(width_in * split * k * k // g for k, g in zip(kernels, groups))
        psa += 2 * split * squeezed + squeezed + split  # shared SEWeight (two 1x1 convs with bias)
        block = inplanes * width_in + 2 * width_in + psa + 2 * width_out + width_out * planes * 4 + 2 * planes * 4
        total += block + planes * 4 * (inplanes + 2)  # first block: downsample conv + bn
        total += (blocks - 1) * (block - (inplanes - planes * 4) * width_in)  # later blocks take planes*4 in
        inplanes = planes * 4
    return total + 2048 * num_classes + num_classes


def search(top: int = 10):
    rows = []
    for in_mult, out_mult in itertools.product(WIDTH_STEPS, WIDTH_STEPS):
        for groups in itertools.product(GROUP_CHOICES, repeat=4):
            p50 = epsanet_params(DEPTHS[0], in_mult, out_mult, groups)
            if p50 is None:
                continue
            p101 = epsanet_params(DEPTHS[1], in_mult, out_mult, groups)
            err = abs(p50 / 1e6 - TARGET[0]) + abs(p101 / 1e6 - TARGET[1])
            rows.append((err, in_mult, out_mult, groups, p50, p101))
    rows.sort()
    return rows[:top]


def reproduces(p50: int, p101: int) -> bool:
    return (round(p50 / 1e6, 2), round(p101 / 1e6, 2)) == TARGET


if __name__ == '__main__':
    print(f'target {TARGET[0]}M / {TARGET[1]}M; closest valid configurations:')
    print('| width in | width out | groups | Large-50 | Large-101 | reproduces |')
    print('|---|---|---|---|---|---|')
    for err, in_mult, out_mult, groups, p50, p101 in search():
        print(f'| {in_mult}x | {out_mult}x | {groups} | {p50 / 1e6:.2f}M | {p101 / 1e6:.2f}M | {reproduces(p50, p101)} |')
    for in_mult in (1, 1.5, 2):
        p50, p101 = (epsanet_params(d, in_mult, 2, (32,) * 4) for d in DEPTHS)
        print(f'all-32 groups, width {in_mult}x in / 2x out: {p50 / 1e6:.2f}M / {p101 / 1e6:.2f}M')
