"""EPSANet (Pyramid Squeeze Attention) for timm.

Importing this package registers epsanet50_small, epsanet50_large, epsanet101_small and
epsanet101_large with timm. After `pip install`, timm also loads it by itself (see
_timm_epsanet_autoload), so `import timm` is enough.
"""
from .psa import PyramidSqueezeAttention, SEWeight, default_groups, default_kernel_sizes
from .epsanet import EPSABottleneck
from ._branch_tuning import set_branch_tuning

__version__ = '0.1.0'

__all__ = [
    'EPSABottleneck',
    'PyramidSqueezeAttention',
    'SEWeight',
    'default_groups',
    'default_kernel_sizes',
    'set_branch_tuning',
]
