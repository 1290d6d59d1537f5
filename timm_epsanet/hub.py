"""Where each variant's weights live on the Hugging Face Hub, and which are published: one place.

The organisation can be overridden with TIMM_EPSANET_HUB_ORG (e.g. for a mirror or a fork), one
model's repo with `pretrained_cfg_overlay=dict(hf_hub_id="org/repo")`.
"""
import os

HUB_ORG = os.environ.get('TIMM_EPSANET_HUB_ORG', 'timm-epsanet')
PRETRAINED_TAG = 'in1k'

# Variants whose Hub repo holds weights. Until a variant is listed here, pretrained=True with its
# default repo fails with a message saying so instead of silently returning random weights.
PUBLISHED = frozenset()


def hub_id(variant: str) -> str:
    """Default Hub repo of a variant, e.g. 'timm-epsanet/epsanet50_small.in1k'."""
    return f'{HUB_ORG}/{variant}.{PRETRAINED_TAG}'


def unpublished_message(variant: str) -> str:
    return (
        f'No pretrained weights are published for {variant} yet (its Hub repo {hub_id(variant)} holds none), '
        f'so pretrained=True cannot load any. Either train it (recipes/imagenet_paper.yaml with timm\'s '
        f'train.py), or load a checkpoint you have: timm.create_model("{variant}", pretrained=True, '
        f'pretrained_cfg_overlay=dict(file="path/to/checkpoint.pth.tar")) takes official-script and '
        f'train.py checkpoints and .safetensors files.'
    )
