"""Where each variant's weights live on the Hugging Face Hub, and which are published: one place.

The organisation can be overridden with TIMM_EPSANET_HUB_ORG (e.g. for a mirror or a fork), one
model's repo with `pretrained_cfg_overlay=dict(hf_hub_id="org/repo")`.
"""
import os
from pathlib import Path
from typing import Optional

from ._download import DownloadError  # noqa: F401  (its public name: `from timm_epsanet.hub import DownloadError`)

DEFAULT_ORG = 'timm-epsanet'
HUB_ORG = os.environ.get('TIMM_EPSANET_HUB_ORG', DEFAULT_ORG)
PRETRAINED_TAG = 'in1k'

# Variants whose Hub repo holds weights. Until a variant is listed here, pretrained=True with its
# default repo fails with a message saying so instead of silently returning random weights
# (a repo in another organisation, set by TIMM_EPSANET_HUB_ORG, is trusted to hold them).
PUBLISHED = frozenset()


def hub_id(variant: str) -> str:
    """Default Hub repo of a variant, e.g. 'timm-epsanet/epsanet50_small.in1k'."""
    return f'{HUB_ORG}/{variant}.{PRETRAINED_TAG}'


def published_hub_id(variant: str) -> Optional[str]:
    """The `hf_hub_id` of a variant's pretrained cfg: its repo once it holds weights, else None.

    timm lists a model under `list_models(pretrained=True)` when its cfg names a weight source, so
    an unpublished variant must name none.
    """
    return hub_id(variant) if variant in PUBLISHED or HUB_ORG != DEFAULT_ORG else None


def is_unpublished_default(variant: str, repo_id: Optional[str]) -> bool:
    """Whether `repo_id` (from a resolved pretrained cfg) names no weights: none at all (the cfg of
    an unpublished variant), or the variant's default repo before it is published."""
    return repo_id is None or (HUB_ORG == DEFAULT_ORG and repo_id == hub_id(variant) and variant not in PUBLISHED)


def recipe_path(name: str = 'imagenet_paper.yaml') -> Optional[Path]:
    """A training recipe as installed: inside the wheel's package, or in a clone of the repository."""
    here = Path(__file__).resolve().parent
    return next((p for p in (here / 'recipes' / name, here.parent / 'recipes' / name) if p.is_file()), None)


def unpublished_message(variant: str) -> str:
    recipe = recipe_path()
    train = f"timm's train.py --config {recipe}" if recipe else "timm's train.py"
    return (
        f'No pretrained weights are published for {variant} yet (its Hub repo {hub_id(variant)} holds none), '
        f'so pretrained=True cannot load any. Either train it ({train}), or load a checkpoint you have: '
        f'timm.create_model("{variant}", pretrained=True, pretrained_cfg_overlay=dict(file="path/to/checkpoint.pth.tar")) '
        f'takes official-script and train.py checkpoints and .safetensors files.'
    )
