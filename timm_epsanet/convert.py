"""Checkpoints to this package's state dict: the official training script's and timm train.py's.

The official code (github.com/murufeng/EPSANet, main.py) saves `{'epoch', 'arch', 'state_dict',
'best_prec1', 'optimizer'}` with DataParallel's `module.` prefix, names the PSA branches
`conv2.conv_1..conv_4`, and concatenates them in reverse order (3, 2, 1, 0). This package
concatenates in the paper's order, so converting permutes the channels that follow PSA: `bn2` and
the input channels of `conv3`. timm's train.py checkpoints already use this package's names.

Everything loads with `weights_only=True` (timm's loader), safetensors without any unpickling.
Every failure is a `CheckpointError` (a ValueError) that names the file and the problem.
"""
import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from timm.models import load_state_dict

__all__ = [
    'CheckpointError', 'convert_official', 'detect_variant', 'is_official', 'load_checkpoint', 'pretrained_filter_fn',
]

_OFFICIAL_BRANCH = re.compile(r'^(layer\d+\.\d+\.conv2)\.conv_(\d+)\.weight$')
_CLASSIFIER = ('fc.weight', 'fc.bias')


class CheckpointError(ValueError):
    """A checkpoint that cannot become this model's weights; the message says which file and why."""


def is_official(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(_OFFICIAL_BRANCH.match(k) for k in state_dict)


def convert_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official key names and branch order -> this package's. Exact: a rename and a permutation."""
    blocks = {}
    for key in state_dict:
        m = _OFFICIAL_BRANCH.match(key)
        if m:
            blocks.setdefault(m.group(1)[:-len('.conv2')], []).append(int(m.group(2)))
    out = {}
    for key, value in state_dict.items():
        m = _OFFICIAL_BRANCH.match(key)
        out[f'{m.group(1)}.convs.{int(m.group(2)) - 1}.weight' if m else key] = value
    for block, branches in blocks.items():
        num_scales = len(branches)
        width = state_dict[f'{block}.conv3.weight'].shape[1]
        split = width // num_scales
        # official channel (S-1-i)*split + c holds our branch i's channel c
        order = torch.cat([torch.arange((num_scales - 1 - i) * split, (num_scales - i) * split)
                           for i in range(num_scales)])
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            key = f'{block}.bn2.{name}'
            if key in out:
                out[key] = out[key][order]
        out[f'{block}.conv3.weight'] = out[f'{block}.conv3.weight'][:, order]
    return out


def detect_variant(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Which registered EPSANet the (converted) weights belong to, from their shapes; None if none."""
    try:
        depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('layer3.'))
        width = state_dict['layer1.0.conv1.weight'].shape[0]
        branch = state_dict['layer1.0.conv2.convs.3.weight']
    except (KeyError, ValueError, IndexError):
        return None
    groups = state_dict['layer1.0.conv1.weight'].shape[0] // branch.shape[1]
    size = {(64, 16): 'small', (128, 32): 'large'}.get((width, groups))
    layers = {6: '50', 23: '101'}.get(depth)
    return f'epsanet{layers}_{size}' if size and layers else None


def _to_timm(state_dict, source: str) -> Dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict) or not state_dict or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f'{source}: holds no state dict of tensors')
    state_dict = {k[len('_orig_mod.'):] if k.startswith('_orig_mod.') else k: v for k, v in state_dict.items()}
    return convert_official(state_dict) if is_official(state_dict) else state_dict


def check_compatible(
        state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str, check_classifier: bool = True,
) -> None:
    """Raise one CheckpointError listing every missing/unexpected key and shape mismatch."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    skip = () if check_classifier else _CLASSIFIER
    missing = sorted(k for k in expected if k not in state_dict and k not in skip)
    unexpected = sorted(k for k in state_dict if k not in expected and k not in skip)
    shapes = sorted(
        f'{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k])}'
        for k in expected if k in state_dict and k not in skip and state_dict[k].shape != expected[k])
    if not (missing or unexpected or shapes):
        return
    problems = []
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)):
        if items:
            shown = ', '.join(items[:5]) + (f' (+{len(items) - 5} more)' if len(items) > 5 else '')
            problems.append(f'{len(items)} {title}: {shown}')
    found, wanted = detect_variant(state_dict), getattr(model, 'pretrained_cfg', {}).get('architecture')
    hint = f' The checkpoint looks like {found}, the model is {wanted}.' if found and found != wanted else ''
    raise CheckpointError(f'{source}: does not fit the model.{hint} ' + '; '.join(problems))


def load_checkpoint(
        path: Union[str, Path], model: Optional[nn.Module] = None, use_ema: bool = False,
) -> Dict[str, torch.Tensor]:
    """Load an official-script, timm train.py or plain/safetensors checkpoint as this package's state dict.

    `use_ema` takes train.py's EMA weights (`state_dict_ema`) when present. With `model`, the
    result is checked against it (keys and shapes) before anything is loaded into it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    try:
        state_dict = load_state_dict(str(path), use_ema=use_ema, weights_only=True)
    except Exception as e:  # torch/safetensors report truncation, foreign formats and pickled code differently
        raise CheckpointError(
            f'{path}: not a readable checkpoint (truncated, corrupt, or not a PyTorch/safetensors file): '
            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
    state_dict = _to_timm(state_dict, str(path))
    if model is not None:
        check_compatible(state_dict, model, str(path))
    return state_dict


def pretrained_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's `pretrained_filter_fn`: official checkpoints convert, others pass; both are checked.

    The classifier is left to timm, which adapts it when `num_classes` differs from the weights'.
    """
    state_dict = _to_timm(state_dict, 'pretrained weights')
    source = model.pretrained_cfg.get('file') or model.pretrained_cfg.get('hf_hub_id') or 'pretrained weights'
    check_compatible(state_dict, model, str(source), check_classifier=False)
    return state_dict
