""" The paper's detectors (Table 3/4 of arXiv:2105.14447) on any timm backbone, with torchvision.

`create_detector('faster_rcnn' | 'mask_rcnn' | 'retinanet', backbone)` returns torchvision's own
FasterRCNN / MaskRCNN / RetinaNet: `model(images, targets)` gives losses in train mode and
detections in eval mode. The backbone is timm's `features_only` model (so EPSANet and timm's
resnet50 baseline go through the same code and the same pretrained loading as classification),
under torchvision's FeaturePyramidNetwork, with the usual detection conventions: BatchNorm frozen
and the stem and early stages frozen (`trainable_layers`, as torchvision's
`trainable_backbone_layers` and mmdetection's `frozen_stages`).
"""
from collections import OrderedDict
from typing import Dict, List, Optional

import timm
import torch
from torch import nn
from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7,
)

__all__ = ['DETECTORS', 'TimmFpnBackbone', 'create_detector', 'detector_param_count']

# the feature strides each detector's FPN is built on: C2-C5 (+ max-pooled P6) for the R-CNNs,
# C3-C5 (+ P6, P7 by stride-2 convs) for RetinaNet, as torchvision's *_resnet50_fpn builders
_FPN_STRIDES = {
    'faster_rcnn': (4, 8, 16, 32),
    'mask_rcnn': (4, 8, 16, 32),
    'retinanet': (8, 16, 32),
}
DETECTORS = tuple(_FPN_STRIDES)
_DETECTOR_CLS = {'faster_rcnn': FasterRCNN, 'mask_rcnn': MaskRCNN, 'retinanet': RetinaNet}
_NUM_BACKBONE_STAGES = 5  # stem + 4 stages, the units `trainable_layers` counts


class TimmFpnBackbone(nn.Module):
    """A timm `features_only` model under an FPN, in the interface torchvision's detectors expect
    (an `out_channels` attribute, an OrderedDict of feature maps keyed '0', '1', ...)."""

    def __init__(self, body: nn.Module, extra_blocks: Optional[ExtraFPNBlock] = None, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.feature_info.channels(),
            out_channels=out_channels,
            extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))
        return self.fpn(features)


def create_detector(
        kind: str,
        backbone: str,
        num_classes: int = 91,
        trainable_layers: int = 3,
        backbone_kwargs: Optional[dict] = None,
        fpn_channels: int = 256,
        p6_from_c5: bool = False,
        **kwargs,
) -> nn.Module:
    """torchvision's `kind` detector with an FPN on timm's `backbone`.

    Args:
        kind: 'faster_rcnn', 'mask_rcnn' or 'retinanet'.
        backbone: a timm model name with `features_only` support and stride 4-32 features
            ('epsanet50_small', 'epsanet50_large', 'resnet50', ...).
        num_classes: torchvision's convention: the R-CNNs count the background (COCO: 81 or the
            91 of torchvision's label ids); RetinaNet's sigmoid classifier has no background class.
        trainable_layers: how many of the backbone's 5 units (stem, 4 stages), counted from the
            last, are trained; the rest are frozen (0-5, default 3 as torchvision).
        backbone_kwargs: passed to `timm.create_model`, e.g. `pretrained=True` or
            `pretrained_cfg_overlay=dict(file='epsanet50_small.pth')` for ImageNet weights.
        fpn_channels: the FPN width.
        p6_from_c5: RetinaNet's P6 from the backbone's last feature map, as mmdetection (the
            paper) and torchvision's retinanet_resnet50_fpn_v2, not from P5 as torchvision's v1.
        **kwargs: passed to torchvision's detector class (`min_size`, `max_size`, ...).
    """
    if kind not in _FPN_STRIDES:
        raise ValueError(f'create_detector: unknown kind {kind!r}; choose one of {DETECTORS}')
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'create_detector: num_classes must be an int >= 1, got {num_classes!r}')
    if p6_from_c5 and kind != 'retinanet':
        raise ValueError(f'create_detector: p6_from_c5 is for RetinaNet; {kind} max-pools P6 from P5')
    if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= _NUM_BACKBONE_STAGES:
        raise ValueError(
            f'create_detector: trainable_layers must be 0-{_NUM_BACKBONE_STAGES} '
            f'(stem + 4 stages), got {trainable_layers!r}')
    body = _create_body(backbone, _FPN_STRIDES[kind], dict(backbone_kwargs or {}))
    _freeze_leading_stages(body, _NUM_BACKBONE_STAGES - trainable_layers)
    # after the weights are in: FrozenBatchNorm2d copies the loaded statistics
    body = freeze_batch_norm_2d(body)
    extra = LastLevelMaxPool()
    if kind == 'retinanet':
        # torchvision's LastLevelP6P7 takes P5 when its input width is the FPN's, else C5
        extra = LastLevelP6P7(body.feature_info.channels()[-1] if p6_from_c5 else fpn_channels, fpn_channels)
    return _DETECTOR_CLS[kind](TimmFpnBackbone(body, extra, fpn_channels), num_classes=num_classes, **kwargs)


def _create_body(backbone: str, strides, backbone_kwargs: dict) -> nn.Module:
    """timm's features_only model with the features at `strides`, or a ValueError saying why not."""
    if not timm.is_model(backbone):
        raise ValueError(f'create_detector: {backbone!r} is not a timm model name')
    for key in ('features_only', 'out_indices'):
        if key in backbone_kwargs:
            raise ValueError(f'create_detector: backbone_kwargs[{key!r}] is set by the detector; leave it out')
    try:
        # the feature info of the whole network first, to pick the indices at the FPN's strides
        with torch.device('meta'):
            probe = timm.create_model(backbone, features_only=True, **_architecture_kwargs(backbone_kwargs))
    except Exception as e:  # timm raises several types for models without feature extraction
        raise ValueError(f'create_detector: backbone {backbone!r} does not support features_only: {e}') from e
    reductions = [info['reduction'] for info in probe.feature_info.info]
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise ValueError(
            f'create_detector: backbone {backbone!r} has feature strides {reductions}, '
            f'the FPN needs {list(strides)} (missing {missing})')
    out_indices = tuple(reductions.index(s) for s in strides)
    return timm.create_model(backbone, features_only=True, out_indices=out_indices, **backbone_kwargs)


def _architecture_kwargs(backbone_kwargs: dict) -> dict:
    return {k: v for k, v in backbone_kwargs.items() if k not in ('pretrained', 'pretrained_cfg_overlay', 'device')}


def _backbone_units(body: nn.Module) -> List[List[nn.Module]]:
    """The children of timm's feature wrapper grouped into the 5 units `trainable_layers` counts.

    The stem: everything up to the stride-2 feature (ResNet: conv1, bn1, act1), or before the
    stride-4 stage where the model has no stride-2 feature (ConvNeXt's stem). Every other child
    belongs to the stage of the next stride 4-32 feature (ResNet: maxpool to stage 1).
    """
    info = body.feature_info.info
    stage_modules = [i['module'].replace('.', '_') for i in info if i['reduction'] in (4, 8, 16, 32)]
    stem_end = next((i['module'].replace('.', '_') for i in info if i['reduction'] == 2), None)
    children = dict(body.named_children())
    if len(stage_modules) != 4 or not set(stage_modules) <= set(children):
        raise ValueError(
            f'create_detector: trainable_layers needs 4 stages at strides 4-32 among the feature '
            f'extractor\'s modules; this backbone has features {[(i["module"], i["reduction"]) for i in info]}')
    units = [[] for _ in range(_NUM_BACKBONE_STAGES)]
    in_stem, stage = True, 0
    for name, child in children.items():
        if in_stem:
            in_stem = name != (stem_end or stage_modules[0])
            if in_stem or stem_end is not None:
                units[0].append(child)
                continue
        units[stage + 1].append(child)
        if stage < 3 and name == stage_modules[stage]:
            stage += 1
    return units


def _freeze_leading_stages(body: nn.Module, num_frozen: int) -> None:
    """requires_grad False for the first `num_frozen` units (stem, stage 1, ...)."""
    for unit in _backbone_units(body)[:num_frozen]:
        for child in unit:
            child.requires_grad_(False)


def detector_param_count(model: nn.Module, trained_only: bool = False) -> int:
    """Parameters of a `create_detector` model, BatchNorm affine included (FrozenBatchNorm2d keeps
    it in buffers).

    `trained_only` leaves out the frozen backbone units, as mmdetection's complexity tool does
    (it counts parameters with requires_grad; its frozen_stages=1 is `trainable_layers=3`): the
    paper's Table 3 counts are of that kind.
    """
    frozen_bn = (FrozenBatchNorm2d, FrozenBatchNormAct2d)
    skipped = set()
    if trained_only:
        for unit in _backbone_units(model.backbone.body):
            modules = [m for child in unit for m in child.modules()]
            if not any(p.requires_grad for m in modules for p in m.parameters(recurse=False)):
                skipped.update(modules)
    total = 0
    for m in model.modules():
        if m in skipped:
            continue
        params = m.parameters(recurse=False)
        total += sum(p.numel() for p in params if p.requires_grad or not trained_only)
        if isinstance(m, frozen_bn):
            total += m.weight.numel() + m.bias.numel()
    return total
