"""Parameter, multiply-add and activation counts, as the paper's Table 2 and timm's model cards report them.

MACs come from PyTorch's public counter `torch.utils.flop_counter.FlopCounterMode` (which counts
2 FLOPs per multiply-add) on a meta-device copy, so nothing is allocated or computed.
"""
import copy
from contextlib import contextmanager
from typing import Iterator, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_copy(model: nn.Module) -> nn.Module:
    """The model on the meta device (shapes only); the model itself if already there.

    Counting several things on one copy saves copying the weights each time."""
    return model if next(model.parameters()).is_meta else copy.deepcopy(model).to('meta')


@contextmanager
def _eval_on_meta(model: nn.Module) -> Iterator[nn.Module]:
    meta = meta_copy(model)
    was_training = meta.training
    try:
        yield meta.eval()
    finally:
        meta.train(was_training)


def count_gmacs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> float:
    """Multiply-adds of one image, in G, as the paper's "FLOPs" column counts them."""
    with _eval_on_meta(model) as meta, FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(1, *input_size, device='meta'))
    return counter.get_total_flops() / 2 / 1e9


def count_activations(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> float:
    """Output elements of every conv and linear layer for one image, in M (timm's 'activations')."""
    total = [0]
    with _eval_on_meta(model) as meta, torch.no_grad():
        hooks = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + o.numel()))
                 for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            meta(torch.empty(1, *input_size, device='meta'))
        finally:
            for h in hooks:
                h.remove()
    return total[0] / 1e6
