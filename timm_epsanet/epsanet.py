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
    No valid configuration reproduces Table 2's Large sizes (docs/large_config.md);
    this one is 7.9% / 8.4% above its 27.90M / 49.59M parameters.
"""
import math
import numbers
from functools import partial
from typing import Optional, Sequence, Type

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_aa, create_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models.resnet import ResNet

from ._download import WEIGHT_FILES, fetch_weights
from .convert import CheckpointError, checkpoint_classes, checkpoint_filter_fn, convert_official_block, read_checkpoint
from .hub import PRETRAINED_TAG, is_unpublished_default, published_hub_id, unpublished_message
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Take the official code's names and branch order for this block too (exact), so that loaders
        without this package's filter load official checkpoints: timm's `load_checkpoint`
        (validate.py --checkpoint, train.py --initial-checkpoint) and `load_state_dict` itself."""
        convert_official_block(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
    _check_model_args(kwargs)
    if pretrained:
        kwargs = _check_pretrained_source(variant, kwargs)
    # what timm's pretrained loader does after the filter: adapt the first conv to in_chans, drop a
    # features_only model's classifier, load strictly or not
    filter_fn = partial(checkpoint_filter_fn, adapts_in_chans=True, features_only=bool(kwargs.get('features_only')),
                        strict=kwargs.get('pretrained_strict', True))
    model = build_model_with_cfg(ResNet, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    for m in (model, getattr(model, 'model', None)):  # some features_only wrappers keep the ResNet as .model
        if isinstance(getattr(m, 'pretrained_cfg', None), dict):
            m.pretrained_cfg.pop('state_dict', None)  # loaded: do not keep a second copy of the weights
    return model


def _check_model_args(kwargs: dict) -> None:
    """Arguments that timm's ResNet would accept and fail on later (or ignore): refuse them now."""
    def bad(name, value, expected):
        raise ValueError(f'{name}={value!r}: expected {expected}')
    for name, low in (('num_classes', 0), ('in_chans', 1)):
        value = kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low):
            bad(name, value, f'an integer >= {low}')
    rate = kwargs.get('drop_path_rate')
    if rate is not None and not (isinstance(rate, numbers.Real) and 0 <= rate < 1):
        bad('drop_path_rate', rate, 'a probability in [0, 1)')


def _check_pretrained_source(variant: str, kwargs: dict) -> dict:
    """Fail early and clearly: unpublished default weights, or weights that cannot be read.

    A local file or a Hub repo is read here (bounded and verified download, format from content,
    finite values), so that a problem is reported with the file's name before timm touches it;
    timm then loads the result as a `state_dict` overlay. The classifier is compared with
    `num_classes` here too: timm would silently re-initialise it.
    """
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.state_dict or cfg.source == 'local-dir' or cfg.url:
        return kwargs  # checked by checkpoint_filter_fn as timm loads them
    if cfg.file:  # train.py's EMA weights where the file has them, as timm's pretrained loader takes them
        state_dict, source = read_checkpoint(cfg.file, use_ema=None), str(cfg.file)
    elif cfg.source == 'hf-hub' or not is_unpublished_default(variant, cfg.hf_hub_id):
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILES
        path, filename = fetch_weights(cfg.hf_hub_id, files, cache_dir=kwargs.get('cache_dir'))
        source = f'{filename} of {cfg.hf_hub_id}'
        state_dict = read_checkpoint(path, name=source)
    else:
        raise RuntimeError(unpublished_message(variant))
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=state_dict, source=None)
    classes = checkpoint_classes(state_dict)
    if classes is not None and classes != cfg.num_classes:
        if kwargs.get('num_classes') is None and not kwargs.get('features_only'):
            raise CheckpointError(
                f'{source}: its classifier has {classes} classes, the model {cfg.num_classes} (the default). Pass '
                f'num_classes={classes} to keep it, or num_classes=0 for a backbone without classifier.')
        overlay['num_classes'] = classes  # timm keeps the classifier when the model's num_classes equals this
    return dict(kwargs, pretrained_cfg_overlay=overlay)


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


def _variant_args(layers, groups, kwargs, **model_args) -> dict:
    """The variant's arguments updated by the caller's; `block_args` merged, not replaced, so that
    e.g. `block_args=dict(psa_branch_form=...)` keeps the variant's PSA groups."""
    block_args = {'psa_groups': groups, **(kwargs.get('block_args') or {})}
    return {'block': EPSABottleneck, 'layers': layers, **model_args, **kwargs, 'block_args': block_args}


def _large_args(layers, kwargs):
    return _variant_args(layers, LARGE_GROUPS, kwargs, base_width=128)  # the double-width bottleneck


@register_model
def epsanet50_small(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet(Small)-50, as in the official code."""
    return _create_epsanet('epsanet50_small', pretrained, **_variant_args((3, 4, 6, 3), SMALL_GROUPS, kwargs))


@register_model
def epsanet101_small(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet(Small)-101, as in the official code."""
    return _create_epsanet('epsanet101_small', pretrained, **_variant_args((3, 4, 23, 3), SMALL_GROUPS, kwargs))


@register_model
def epsanet50_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet(Large)-50: double-width bottleneck, PSA groups (32, 32, 32, 32)."""
    return _create_epsanet('epsanet50_large', pretrained, **_large_args((3, 4, 6, 3), kwargs))


@register_model
def epsanet101_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet(Large)-101: double-width bottleneck, PSA groups (32, 32, 32, 32)."""
    return _create_epsanet('epsanet101_large', pretrained, **_large_args((3, 4, 23, 3), kwargs))
