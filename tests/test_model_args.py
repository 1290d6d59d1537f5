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
