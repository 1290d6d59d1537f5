"""The official EPSANet code's model, as the reference this package is checked and timed against.

The official repository (https://github.com/murufeng/EPSANet, `models/epsanet.py`) names the PSA
branches `conv_1..conv_S`, calls SEWeight once per branch, stacks the gates before the softmax,
and concatenates the weighted branches last first (S-1, ..., 1, 0). `convert.py` converts
checkpoints of this model; the tests compare this package's forward and conversion with it; the
benchmarks time it as the baseline ("faster than the original" is measured against it).

It lives in the package, privately, so that tests and benchmark scripts import one definition
without path tricks; nothing in the package's own code paths uses it.
"""
import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .psa import PyramidSqueezeAttention

__all__ = ['OfficialEPSANet', 'OfficialEPSABlock', 'OfficialPSA', 'save_official_checkpoint', 'to_official_structure']


class OfficialSEWeight(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class OfficialPSA(nn.Module):
    """The official `PSAModule`: its parameter names and its forward, branch by branch."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1,
                 kernel_sizes: Sequence[int] = (3, 5, 7, 9), groups: Sequence[int] = (1, 4, 8, 16)):
        super().__init__()
        self.num_scales = len(kernel_sizes)
        self.split_chs = out_chs // self.num_scales
        for i, (k, g) in enumerate(zip(kernel_sizes, groups)):
            conv = nn.Conv2d(in_chs, self.split_chs, k, stride, k // 2, groups=g, bias=False)
            setattr(self, f'conv_{i + 1}', conv)
        self.se = OfficialSEWeight(self.split_chs)

    @property
    def convs(self):
        return [getattr(self, f'conv_{i + 1}') for i in range(self.num_scales)]

    @classmethod
    def sharing_weights(cls, psa: PyramidSqueezeAttention) -> 'OfficialPSA':
        """The official structure computing with `psa`'s own parameters (shared, not copied).

        Its output holds `psa`'s branches in the official (reversed) order."""
        first = psa.convs[0]
        official = cls(first.in_channels, psa.num_scales * psa.split_chs, first.stride[0],
                       [c.kernel_size[0] for c in psa.convs], [c.groups for c in psa.convs])
        official.to(device=first.weight.device, dtype=first.weight.dtype)
        for theirs, ours in zip(official.convs, psa.convs):
            theirs.padding, theirs.dilation = ours.padding, ours.dilation
            theirs.weight = ours.weight
        official.se = psa.se
        return official

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [conv(x) for conv in self.convs]
        b, _, h, w = feats[0].shape
        stacked = torch.cat(feats, 1).view(b, self.num_scales, self.split_chs, h, w)
        gates = torch.cat([self.se(f) for f in feats], 1).view(b, self.num_scales, self.split_chs, 1, 1)
        weighted = stacked * gates.softmax(dim=1)
        out = weighted[:, 0]
        for i in range(1, self.num_scales):
            out = torch.cat((weighted[:, i], out), 1)
        return out


class OfficialEPSABlock(nn.Module):
    """The official `EPSABlock`: a ResNet bottleneck whose 3x3 conv is PSA (stride in PSA)."""
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, groups: Sequence[int] = (1, 4, 8, 16)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = OfficialPSA(planes, planes, stride, groups=groups)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride != 1 or in_chs != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, planes * self.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class OfficialEPSANet(nn.Module):
    """The official `EPSANet` (Small): `layers=(3, 4, 6, 3)` is EPSANet-50, `(3, 4, 23, 3)` EPSANet-101."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_chs = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = []
            for b in range(blocks):
                stage.append(OfficialEPSABlock(in_chs, planes, 2 if b == 0 and i > 0 else 1))
                in_chs = planes * OfficialEPSABlock.expansion
            setattr(self, f'layer{i + 1}', nn.Sequential(*stage))
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(4):
            x = getattr(self, f'layer{i + 1}')(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def to_official_structure(model: nn.Module) -> nn.Module:
    """Replace, in place, every PSA of `model` by the official forward sharing its weights.

    Same parameters, the official computation: what is timed is the structure, not other weights.
    The channels after each PSA come in the official order, so the logits differ from `model`'s.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, PyramidSqueezeAttention):
            parent_name, _, child = name.rpartition('.')
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, OfficialPSA.sharing_weights(module))
    return model


def save_official_checkpoint(model: nn.Module, path, bare: bool = False):
    """Save `model` (an `OfficialEPSANet`) as the official main.py does: DataParallel's `module.`
    prefixes, with epoch, arch, best_prec1 and an SGD optimizer state (or, `bare`, the state
    dict alone). Returns `path`. The file holds `model`'s weights, which stay as they are."""
    state_dict = {f'module.{k}': v for k, v in model.state_dict().items()}
    if bare:
        torch.save(state_dict, path)
        return path
    stepped = copy.deepcopy(model)  # a step on a copy gives the optimizer state its momentum buffers
    optimizer = torch.optim.SGD(stepped.parameters(), lr=0.1, momentum=0.9)
    stepped(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    torch.save({'epoch': 100, 'arch': 'epsanet50', 'state_dict': state_dict, 'best_prec1': torch.tensor(77.49),
                'optimizer': optimizer.state_dict()}, path)
    return path
