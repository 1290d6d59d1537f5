"""Parameter and multiply-add counts, as the paper's Table 2 reports them.

MACs come from PyTorch's public counter `torch.utils.flop_counter.FlopCounterMode` (which counts
2 FLOPs per multiply-add) on a meta-device copy, so nothing is allocated or computed.
"""
from typing import Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> float:
    """Multiply-adds of one image, in G, as the paper's "FLOPs" column counts them."""
    meta = model if next(model.parameters()).is_meta else _meta_copy(model)
    was_training = meta.training
    meta.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(1, *input_size, device='meta'))
    meta.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def _meta_copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).to('meta')
