"""The official code's PSA forward, as a speed baseline: "faster than the original" is measured here.

`to_official_structure(model)` swaps every PSA module of an EPSANet for one that computes what
the official `PSAModule.forward` computes, the way it computes it: four grouped convs, SEWeight
called once per branch, concatenations and a stack before the softmax, and a Python loop that
concatenates the weighted branches in reverse order. It shares the original module's weights, so
it measures the structure, not different weights. The channel order of its output is the official
one (reversed), so the logits differ from ours; speed is what it is for.
"""
import torch
from torch import nn

from timm_epsanet import PyramidSqueezeAttention


class OfficialStructurePSA(nn.Module):
    def __init__(self, psa: PyramidSqueezeAttention):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                      bias=False, device=c.weight.device, dtype=c.weight.dtype)
            for c in psa.convs
        ])
        for official, ours in zip(self.convs, psa.convs):
            official.weight = ours.weight
        self.se = psa.se
        self.split_chs = psa.split_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [conv(x) for conv in self.convs]
        batch = x.shape[0]
        feats = torch.cat(branches, dim=1)
        feats = feats.view(batch, len(branches), self.split_chs, feats.shape[2], feats.shape[3])
        x_se = torch.cat([self.se(b) for b in branches], dim=1)
        attention = x_se.view(batch, len(branches), self.split_chs, 1, 1).softmax(dim=1)
        weighted = feats * attention
        out = weighted[:, 0]
        for i in range(1, len(branches)):
            out = torch.cat((weighted[:, i], out), dim=1)
        return out


def to_official_structure(model: nn.Module) -> nn.Module:
    """Replace, in place, every PSA module of `model` by the official forward's structure."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PyramidSqueezeAttention):
            parent_name, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent_name) if parent_name else model, child, OfficialStructurePSA(module))
    return model
