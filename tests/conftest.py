"""Shared fixtures. The `slow` marker is registered in pyproject.toml: `python -m pytest -m "not slow"`
is the quick run, `python -m pytest` (CI, the README) runs everything."""
import pytest
import torch
from torch import nn


def randomize_bn(module: nn.Module) -> nn.Module:
    """Trained-looking BatchNorm parameters and statistics, so that a wrong channel order shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module


@pytest.fixture(scope='session')
def trained_bn():
    """`randomize_bn`, for tests and fixtures that build their own models."""
    return randomize_bn
