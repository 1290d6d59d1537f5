"""Checkpoints to this package's state dict: the official training script's and timm train.py's.

The official code (github.com/murufeng/EPSANet, main.py) saves `{'epoch', 'arch', 'state_dict',
'best_prec1', 'optimizer'}` with DataParallel's `module.` prefix, names the PSA branches
`conv2.conv_1..conv_4`, and concatenates them in reverse order (3, 2, 1, 0). This package
concatenates in the paper's order, so converting permutes the channels that follow PSA: `bn2` and
the input channels of `conv3`. timm's train.py checkpoints already use this package's names.
Each EPSA bottleneck also converts its own weights as they load (`convert_official_block`), so
loaders that pass no filter take official checkpoints too.

`read_checkpoint` reads a file (format told by its content, never by its name; `weights_only`
loading, safetensors without unpickling). `checkpoint_filter_fn` is timm's filter convention:
`pretrained_filter_fn` of the models, or `timm.models.load_checkpoint(..., filter_fn=...)`.
Every failure is a `CheckpointError` (a ValueError) that names the file and the problem.
"""
import argparse
import pickle
import re
import struct
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.models import clean_state_dict

__all__ = [
    'CheckpointError', 'check_compatible', 'check_finite', 'checkpoint_filter_fn', 'convert_official',
    'convert_official_block', 'detect_variant', 'is_official', 'load_weights', 'read_checkpoint',
]

_OFFICIAL_BRANCH = re.compile(r'^(.*\.)?conv2\.conv_(\d+)\.weight$')  # group 1: the block's prefix
_CLASSIFIER = ('fc.weight', 'fc.bias')
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit
_EMA_KEYS = ('state_dict_ema', 'model_ema')  # timm train.py's, then older scripts'
_WEIGHT_KEYS = ('state_dict', 'model')
# first bytes of files people mistake for checkpoints
_FOREIGN_MAGIC = {
    b'\xff\xd8\xff': 'a JPEG image', b'\x89PNG': 'a PNG image', b'GIF8': 'a GIF image', b'%PDF': 'a PDF document',
    b'\x1f\x8b': 'a gzip archive', b'\x93NUMPY': 'a NumPy .npy array', b'\x89HDF': 'an HDF5 (Keras) file',
}


class CheckpointError(ValueError):
    """A checkpoint that cannot become this model's weights; the message says which file and why."""


def is_official(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(_OFFICIAL_BRANCH.match(k) for k in state_dict)


def convert_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official key names and branch order -> this package's. Exact: a rename and a permutation."""
    out = dict(state_dict)
    for block in {m.group(1) or '' for m in map(_OFFICIAL_BRANCH.match, state_dict) if m}:
        convert_official_block(out, block)
    return out


def convert_official_block(state_dict: Dict[str, torch.Tensor], prefix: str) -> None:
    """In place, the official names and order of one block's weights (keys `prefix` + ...) ->
    this package's; nothing where the block holds none.

    The branches `conv2.conv_1..S` become `conv2.convs.0..S-1`. The official code concatenates
    them in reverse, so the channels that follow PSA (`bn2`, the input of `conv3`) are permuted.
    """
    num_scales = 0
    while f'{prefix}conv2.conv_{num_scales + 1}.weight' in state_dict:
        official = state_dict.pop(f'{prefix}conv2.conv_{num_scales + 1}.weight')
        state_dict[f'{prefix}conv2.convs.{num_scales}.weight'] = official
        num_scales += 1
    conv3, bn2 = f'{prefix}conv3.weight', f'{prefix}bn2.'
    if num_scales == 0 or not (conv3 in state_dict or bn2 + 'weight' in state_dict):
        return  # not official, or no channels after the branches to permute
    width = state_dict[conv3].shape[1] if conv3 in state_dict else state_dict[bn2 + 'weight'].numel()
    split = width // num_scales
    # official channel (S-1-i)*split + c holds our branch i's channel c
    order = torch.cat([torch.arange((num_scales - 1 - i) * split, (num_scales - i) * split) for i in range(num_scales)])
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        if bn2 + name in state_dict:
            state_dict[bn2 + name] = state_dict[bn2 + name][order]
    if conv3 in state_dict:
        state_dict[conv3] = state_dict[conv3][:, order]


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


def _shown(items, limit: int = 5) -> str:
    items = list(items)
    return ', '.join(items[:limit]) + (f' (+{len(items) - limit} more)' if len(items) > limit else '')


def check_finite(state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf weights: they load silently and make every output NaN."""
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point() and v.numel()}
    if not floats:
        return
    # largest magnitude per tensor: NaN if any element is NaN (amax propagates it), Inf if any is Inf
    finite = torch.isfinite(torch.stack([v.detach().abs().amax().float().cpu() for v in floats.values()]))
    bad = [k for k, ok in zip(floats, finite.tolist()) if not ok]
    if bad:
        raise CheckpointError(
            f'{source}: {len(bad)} tensor(s) hold NaN or Inf values: {_shown(bad)}. Such weights make every '
            f'output NaN; use a checkpoint saved before training diverged.')


def check_compatible(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        source: str,
        check_classifier: bool = True,
        adapted: Sequence[str] = (),
        strict: bool = True,
) -> None:
    """Raise one CheckpointError listing every missing/unexpected key and shape mismatch; the
    shapes of the keys in `adapted` are the loader's to adapt. Not `strict`: shape mismatches
    only, as `load_state_dict(strict=False)` refuses only those."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    skip = () if check_classifier else _CLASSIFIER
    missing = sorted(k for k in expected if k not in state_dict and k not in skip) if strict else []
    unexpected = sorted(k for k in state_dict if k not in expected and k not in skip) if strict else []
    shapes = sorted(
        f'{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k])}'
        for k in expected
        if k in state_dict and k not in skip and k not in adapted and state_dict[k].shape != expected[k])
    if not (missing or unexpected or shapes):
        return
    problems = [f'{len(items)} {title}: {_shown(items)}' for title, items in (
        ('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)) if items]
    found, wanted = detect_variant(state_dict), getattr(model, 'pretrained_cfg', {}).get('architecture')
    hint = f' The checkpoint looks like {found}, the model is {wanted}.' if found and found != wanted else ''
    raise CheckpointError(f'{source}: does not fit the model.{hint} ' + '; '.join(problems))


def checkpoint_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """Number of classes of the checkpoint's classifier, None without one."""
    weight = state_dict.get('fc.weight')
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _file_format(path: Path, name: str) -> str:
    """'safetensors' or 'torch', from the first bytes; CheckpointError for anything else."""
    if path.is_dir():
        raise CheckpointError(f'{name}: is a directory, not a checkpoint file (name the file inside it)')
    if not path.is_file():
        raise CheckpointError(f'{name}: no such file')
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f'{name}: is empty (0 bytes); the file was not written completely')
    with open(path, 'rb') as f:
        head = f.read(16)
    if head.startswith(b'PK\x03\x04') or head.startswith(b'\x80'):  # torch.save zip archive, or legacy pickle
        return 'torch'
    if size >= 10 and head[8:9] == b'{' and 2 <= struct.unpack('<Q', head[:8])[0] <= _MAX_SAFETENSORS_HEADER:
        return 'safetensors'  # 8-byte little-endian header length, then the JSON header
    for magic, kind in _FOREIGN_MAGIC.items():
        if head.startswith(magic):
            raise CheckpointError(f'{name}: not a checkpoint, it is {kind}')
    raise CheckpointError(
        f'{name}: not a checkpoint: neither a PyTorch file (torch.save) nor a safetensors file '
        f'(it starts with {head[:8]!r})')


def _torch_load(path: Path) -> Any:
    with open(path, 'rb') as f:  # a file object: torch.load would pick its reader by a path's extension
        load = partial(torch.load, f, map_location='cpu', weights_only=True)
        if not hasattr(torch.serialization, 'safe_globals'):  # torch < 2.5
            return load()
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm train.py checkpoints hold their args
            return load()


def _load_file(path: Path, name: str) -> Any:
    fmt = _file_format(path, name)
    try:
        if fmt == 'safetensors':
            import safetensors.torch
            return safetensors.torch.load_file(str(path), device='cpu')
        return _torch_load(path)
    except Exception as e:  # truncation, corruption and pickled code are reported in torch's/safetensors' words
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError) and 'weights only' in str(e).lower():
            reason = ('it holds pickled Python objects besides tensors, which are never unpickled here '
                      f'(weights_only loading; {first[:200]})')
        else:
            reason = f'truncated or corrupt ({type(e).__name__}: {first[:200]})'
        raise CheckpointError(f'{name}: not a readable checkpoint ({fmt} file): {reason}') from None


def _describe(entries: Dict[str, Any]) -> str:
    def kind(v):
        if isinstance(v, dict):
            return f'dict of {sum(torch.is_tensor(x) for x in v.values())} tensors'
        return type(v).__name__
    return _shown([f'{k} ({kind(v)})' for k, v in entries.items()], limit=8)


def _select_weights(checkpoint: Any, source: str, use_ema: Optional[bool]) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise CheckpointError(f'{source}: holds a {type(checkpoint).__name__}, not a dict of weights')
    key = next((k for k in _EMA_KEYS if isinstance(checkpoint.get(k), dict)), None) if use_ema is not False else None
    if use_ema and key is None:
        raise CheckpointError(
            f'{source}: has no EMA weights (no {" or ".join(_EMA_KEYS)} entry; its entries: '
            f'{_describe(checkpoint)}). Leave out the EMA option to use its weights.')
    if key is None:
        key = next((k for k in _WEIGHT_KEYS if isinstance(checkpoint.get(k), dict)), None)
    weights = checkpoint[key] if key else checkpoint
    tensors = {k: v for k, v in weights.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointError(
            f'{source}: holds no tensors at its top level nor under {", ".join(_WEIGHT_KEYS)}; its entries: '
            f'{_describe(weights)}')
    return tensors  # besides tensors, a flat checkpoint may carry e.g. an epoch or optimizer entry


def _to_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    state_dict = clean_state_dict(state_dict)  # DataParallel's module., torch.compile's _orig_mod.
    return convert_official(state_dict) if is_official(state_dict) else state_dict


def load_weights(
        path: Union[str, Path], use_ema: Optional[bool] = False, name: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file as saved (wrapper prefixes removed), checked to be finite.

    `use_ema`: True takes train.py's EMA weights and fails if the file has none; None takes them
    where the file has them, as timm's own loaders do by default; False never. `name`: what
    messages call the file (default: its path).
    """
    path = Path(path)
    name = name or str(path)
    state_dict = clean_state_dict(_select_weights(_load_file(path, name), name, use_ema))
    check_finite(state_dict, name)
    return state_dict


def read_checkpoint(
        path: Union[str, Path], use_ema: Optional[bool] = False, name: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """An official-script, timm train.py or plain/safetensors checkpoint as this package's state dict.

    Fitting it to a model is `check_compatible`'s job.
    """
    return _to_timm(load_weights(path, use_ema, name))


def _weights_source(model: nn.Module) -> str:
    """How error messages name the weights being loaded into `model`."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return str(cfg.get('file') or cfg.get('hf_hub_id') or 'checkpoint')


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        adapts_in_chans: bool = False,
        features_only: bool = False,
        strict: bool = True,
) -> Dict[str, torch.Tensor]:
    """timm's checkpoint filter: official checkpoints convert, others pass; both are checked.

    A different `num_classes` is timm's to adapt (it re-initialises the classifier); a classifier
    that does not match the one timm will keep is an error that says which `num_classes` to pass.
    The models' `pretrained_filter_fn` says what timm's pretrained loader does after this filter:
    `adapts_in_chans`, it adapts the first conv to the model's `in_chans`, so that conv may differ
    in its input channels here (`timm.models.load_checkpoint` adapts nothing); `features_only`, it
    drops the classifier, which need not fit then; not `strict` (timm's `pretrained_strict=False`),
    it loads what fits by name, so only tensors whose shapes differ are refused.
    """
    source = _weights_source(model)
    state_dict = _to_timm({k: v for k, v in state_dict.items() if torch.is_tensor(v)})
    check_finite(state_dict, source)
    adapted = _input_convs_to_adapt(state_dict, model) if adapts_in_chans else ()
    check_compatible(state_dict, model, source, check_classifier=False, adapted=adapted, strict=strict)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if not features_only and getattr(model, 'num_classes', 0) == cfg.get('num_classes'):
        _check_kept_classifier(state_dict, model, source, strict)
    return state_dict


def _check_kept_classifier(state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str, strict: bool) -> None:
    """timm keeps the checkpoint's classifier where the model has the pretrained config's
    `num_classes` (it drops it for any other): the checkpoint must hold one of the model's classes
    and feature width (not `strict`: or none). Each way it can differ is named, with the
    `num_classes` that fixes it."""
    expected = model.state_dict()
    keys = [k for k in _CLASSIFIER if k in expected and (strict or k in state_dict)]
    classes = checkpoint_classes(state_dict)
    if any(k not in state_dict for k in keys):
        raise CheckpointError(
            f'{source}: holds no classifier ({", ".join(k for k in keys if k not in state_dict)} missing), as a '
            f'backbone\'s weights do. Pass num_classes=0 for a backbone, or your task\'s num_classes for a new '
            f'classifier.')
    if classes is not None and classes != model.num_classes:
        raise CheckpointError(
            f'{source}: its classifier has {classes} classes, the model {model.num_classes}. Pass '
            f'num_classes={classes} to keep it, or num_classes=0 for a backbone without classifier.')
    shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}'
              for k in keys if state_dict[k].shape != expected[k].shape]
    if shapes:  # the same classes on features of another width: a global_pool such as catavgmax
        raise CheckpointError(
            f'{source}: its classifier does not fit the model\'s ({"; ".join(shapes)}), as with a global_pool '
            f'that changes the feature width. Pass another num_classes for a new classifier, or num_classes=0.')


def _input_convs_to_adapt(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Tuple[str, ...]:
    """The weights of the model's first convs (`pretrained_cfg['first_conv']`) that timm's
    pretrained loader adapts to the model's input channels (summing the filters over the
    channels for one, repeating them for more): the checkpoint's hold the pretrained config's
    channels (`input_size[0]`), the model's another count, and they agree in every other dim."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('first_conv') or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    source_chans = (cfg.get('input_size') or (3,))[0]
    modules = dict(model.named_modules())
    keys = []
    for name in names:
        conv, weight = modules.get(name), state_dict.get(f'{name}.weight')
        if not isinstance(conv, nn.Conv2d) or weight is None or weight.ndim != 4:
            continue
        if (conv.in_channels != source_chans and weight.shape[1] * conv.groups == source_chans
                and weight.shape[0] == conv.weight.shape[0] and weight.shape[2:] == conv.weight.shape[2:]):
            keys.append(f'{name}.weight')
    return tuple(keys)
