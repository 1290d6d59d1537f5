"""Model arguments that timm's ResNet would accept and fail on later, or silently ignore, fail at
construction with a ValueError that names them."""
import pytest
import timm

import timm_epsanet  # noqa: F401


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_classes=-1), 'num_classes'),
    (dict(num_classes=2.5), 'num_classes'),
    (dict(in_chans=0), 'in_chans'),
    (dict(drop_path_rate=2.0), 'drop_path_rate'),
    (dict(drop_path_rate=1.0), 'drop_path_rate'),
    (dict(drop_path_rate=-0.5), 'drop_path_rate'),
    (dict(drop_path_rate=float('nan')), 'drop_path_rate'),
])
def test_bad_model_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f'^{name}='):
        timm.create_model('epsanet50_small', **kwargs)


def test_edge_values_build():
    model = timm.create_model('epsanet50_small', num_classes=0, in_chans=1, drop_path_rate=0.0)
    assert model.num_classes == 0 and model.conv1.in_channels == 1


@pytest.mark.parametrize('variant', ['epsanet50_small', 'epsanet50_large'])
def test_block_args_add_to_the_variant(variant):
    """`block_args` (e.g. a branch form) adds to the variant's own: Large keeps its PSA groups
    (32 each) and its parameter count, instead of silently taking the block's defaults (Small's)."""
    default = timm.create_model(variant, device='meta')
    model = timm.create_model(variant, device='meta', block_args=dict(psa_branch_form='grouped'))
    psa = model.layer1[0].conv2
    assert psa.groups == default.layer1[0].conv2.groups
    assert psa.groups == ((32,) * 4 if variant.endswith('large') else (1, 4, 8, 16))
    assert {c.form for c in psa.convs} == {'grouped'}
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in default.parameters())
    wider = timm.create_model(variant, device='meta', block_args=dict(psa_groups=(1, 2, 4, 8)))
    assert wider.layer1[0].conv2.groups == (1, 2, 4, 8)  # the caller's own groups win
