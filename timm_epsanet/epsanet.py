""" EPSANet: ResNet with the bottleneck's 3x3 conv replaced by Pyramid Squeeze Attention.

Paper: `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447
Official code: https://github.com/murufeng/EPSANet (only the Small variants are in it)

Like timm's sknet.py and res2net.py, this file only supplies a bottleneck block; timm's `ResNet`
and `build_model_with_cfg` provide the rest (features_only, feature_info, forward_intermediates,
classifier handling, grad checkpointing, pretrained loading).

Variants (Table 1/2 of the paper), PSA kernels (3, 5, 7, 9):
  * Small: bottleneck width as ResNet, PSA groups (1, 4, 8, 16) - exactly the official code.
  * Large: PSA groups (32, 32, 32, 32) as the paper says, with the wider conv1 and PSA channels
    its Table 1 implies: bottleneck width doubled (base_width=128), the widths of ResNeXt-50 32x4d.
    No valid configuration reproduces Table 2's Large sizes (README, "The Large configuration");
    this one is 7.9% / 8.4% above its 27.90M / 49.59M parameters.
"""
import math
from typing import Optional, Sequence, Type

import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_aa, create_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models.resnet import ResNet

from .convert import load_checkpoint, pretrained_filter_fn
from .hub import PRETRAINED_TAG, hub_failure_message, is_unpublished_default, published_hub_id, unpublished_message
from .psa import PyramidSqueezeAttention

__all__ = ['EPSABottleneck']

SMALL_GROUPS = (1, 4, 8, 16)
LARGE_GROUPS = (32, 32, 32, 32)
PSA_KERNELS = (3, 5, 7, 9)


class EPSABottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> PSA -> 1x1, expansion 4) with the block's stride in PSA.

    Takes the same arguments as timm's `Bottleneck` (so `ResNet` can build it) plus the PSA
    configuration. `base_width` widens the block as in ResNet/ResNeXt (128 for EPSANet Large).
    """
    expansion = 4

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            attn_layer: Optional[Type[nn.Module]] = None,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Type[nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            psa_kernel_sizes: Sequence[int] = PSA_KERNELS,
            psa_groups: Sequence[int] = SMALL_GROUPS,
            psa_se_reduction: int = 16,
            psa_branch_form: str = 'auto',
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if cardinality != 1:
            raise ValueError(
                f'EPSABottleneck does not use cardinality (got {cardinality}); '
                f'set the PSA branch groups with psa_groups instead')
        width = int(math.floor(planes * (base_width / 64)))
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)

        self.conv2 = PyramidSqueezeAttention(
            first_planes,
            width,
            stride=1 if use_aa else stride,
            kernel_sizes=psa_kernel_sizes,
            groups=psa_groups,
            se_reduction=psa_se_reduction,
            dilation=first_dilation,
            branch_form=psa_branch_form,
            act_layer=act_layer,
            **dd,
        )
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=width, stride=stride, enable=use_aa, **dd)

        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.se = create_attn(attn_layer, outplanes, **dd)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


def _create_epsanet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    if pretrained:
        kwargs = _check_pretrained_source(variant, kwargs)
    try:
        return build_model_with_cfg(ResNet, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, **kwargs)
    except (LocalEntryNotFoundError, SafetensorError) as e:
        raise RuntimeError(hub_failure_message(variant, e)) from e


def _check_pretrained_source(variant: str, kwargs: dict) -> dict:
    """Fail early and clearly: unpublished default weights, or a local file that cannot be read."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.file and not cfg.state_dict and cfg.source != 'local-dir':
        # read (and convert) it here, so a bad file is reported with its name before timm touches it
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=load_checkpoint(cfg.file))
        return dict(kwargs, pretrained_cfg_overlay=overlay)
    own_source = cfg.state_dict or cfg.url or cfg.file or cfg.source in ('hf-hub', 'local-dir')
    if not own_source and is_unpublished_default(variant, cfg.hf_hub_id):
        raise RuntimeError(unpublished_message(variant))
    return kwargs


def _cfg(**kwargs):
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_name': 'EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network',
        'paper_ids': 'arXiv:2105.14447',
        'origin_url': 'https://github.com/murufeng/EPSANet',
        **kwargs,
    }


_LARGE_NOTE = (
    'Large: PSA groups (32, 32, 32, 32) as in the paper, bottleneck width x2 (base_width=128). '
    'The paper gives no Large widths, and no valid configuration reproduces its Table 2 sizes: '
    'this one has 30.10M / 53.74M params (+7.9% / +8.4% vs 27.90M / 49.59M) and '
    '5.05 / 9.67 GMACs (+7.0% / +7.8% vs 4.72G / 8.97G).'
)

default_cfgs = generate_default_cfgs({
    f'epsanet50_small.{PRETRAINED_TAG}': _cfg(
        hf_hub_id=published_hub_id('epsanet50_small'),
        description='EPSANet(Small)-50: 22.56M params, 3.60 GMACs; paper top-1 77.49 (ImageNet-1k).'),
    f'epsanet101_small.{PRETRAINED_TAG}': _cfg(
        hf_hub_id=published_hub_id('epsanet101_small'),
        description='EPSANet(Small)-101: 38.90M params, 6.79 GMACs; paper top-1 78.43 (ImageNet-1k).'),
    f'epsanet50_large.{PRETRAINED_TAG}': _cfg(
        hf_hub_id=published_hub_id('epsanet50_large'),
        description='EPSANet(Large)-50: 30.10M params, 5.05 GMACs; paper top-1 78.64 (ImageNet-1k).',
        notes=(_LARGE_NOTE,)),
    f'epsanet101_large.{PRETRAINED_TAG}': _cfg(
        hf_hub_id=published_hub_id('epsanet101_large'),
        description='EPSANet(Large)-101: 53.74M params, 9.67 GMACs; paper top-1 79.38 (ImageNet-1k).',
        notes=(_LARGE_NOTE,)),
})


def _small_args(layers):
    return dict(block=EPSABottleneck, layers=layers, block_args=dict(psa_groups=SMALL_GROUPS))


def _large_args(layers):
    return dict(block=EPSABottleneck, layers=layers, base_width=128, block_args=dict(psa_groups=LARGE_GROUPS))


@register_model
def epsanet50_small(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet(Small)-50, as in the official code."""
    return _create_epsanet('epsanet50_small', pretrained, **dict(_small_args((3, 4, 6, 3)), **kwargs))


@register_model
def epsanet101_small(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet(Small)-101, as in the official code."""
    return _create_epsanet('epsanet101_small', pretrained, **dict(_small_args((3, 4, 23, 3)), **kwargs))


@register_model
def epsanet50_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet(Large)-50: double-width bottleneck, PSA groups (32, 32, 32, 32)."""
    return _create_epsanet('epsanet50_large', pretrained, **dict(_large_args((3, 4, 6, 3)), **kwargs))


@register_model
def epsanet101_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet(Large)-101: double-width bottleneck, PSA groups (32, 32, 32, 32)."""
    return _create_epsanet('epsanet101_large', pretrained, **dict(_large_args((3, 4, 23, 3)), **kwargs))
