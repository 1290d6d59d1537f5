"""Where each variant's weights live on the Hugging Face Hub, and which are published: one place.

The organisation can be overridden with TIMM_EPSANET_HUB_ORG (e.g. for a mirror or a fork), one
model's repo with `pretrained_cfg_overlay=dict(hf_hub_id="org/repo")`.
"""
import os
from typing import Optional

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


def unpublished_message(variant: str) -> str:
    return (
        f'No pretrained weights are published for {variant} yet (its Hub repo {hub_id(variant)} holds none), '
        f'so pretrained=True cannot load any. Either train it (recipes/imagenet_paper.yaml with timm\'s '
        f'train.py), or load a checkpoint you have: timm.create_model("{variant}", pretrained=True, '
        f'pretrained_cfg_overlay=dict(file="path/to/checkpoint.pth.tar")) takes official-script and '
        f'train.py checkpoints and .safetensors files.'
    )


def hub_failure_message(variant: str, error: Exception) -> str:
    """Say what went wrong fetching weights from the Hub, and what to do about it."""
    from huggingface_hub import constants
    if isinstance(error, FileNotFoundError) or type(error).__name__ == 'LocalEntryNotFoundError':
        cause = f' ({error.__cause__})' if error.__cause__ else ''
        if constants.HF_HUB_OFFLINE:
            return (f'The weights of {variant} are not in the local Hugging Face cache and HF_HUB_OFFLINE is set, '
                    f'so they cannot be downloaded. Run once with network access (HF_HUB_OFFLINE unset) to cache '
                    f'them, or pass a local file: pretrained_cfg_overlay=dict(file="model.safetensors").')
        return (f'Could not download the weights of {variant} from {constants.ENDPOINT}, and they are not in the '
                f'local cache{cause}. Check the connection and the HF_ENDPOINT setting and try again, or pass a '
                f'local file: pretrained_cfg_overlay=dict(file="model.safetensors").')
    return (f'The weights of {variant} downloaded from the Hub cannot be read ({error}); the download is probably '
            f'corrupted. Delete it from the cache (`hf cache delete`) and try again.')
