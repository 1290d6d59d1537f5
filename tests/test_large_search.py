"""The Large-configuration search behind the README's claim: its counting is right, and it finds no match."""
import importlib.util
from pathlib import Path

import pytest
import timm

import timm_epsanet  # noqa: F401
from timm_epsanet.complexity import count_params

spec = importlib.util.spec_from_file_location(
    'search_large_config', Path(__file__).resolve().parents[1] / 'tools' / 'search_large_config.py')
search = importlib.util.module_from_spec(spec)
spec.loader.exec_module(search)


@pytest.mark.parametrize('name, layers, mult, groups', [
    ('epsanet50_small', (3, 4, 6, 3), 1, (1, 4, 8, 16)),
    ('epsanet101_small', (3, 4, 23, 3), 1, (1, 4, 8, 16)),
    ('epsanet50_large', (3, 4, 6, 3), 2, (32, 32, 32, 32)),
    ('epsanet101_large', (3, 4, 23, 3), 2, (32, 32, 32, 32)),
])
def test_closed_form_count_matches_real_models(name, layers, mult, groups):
    model = timm.create_model(name, device='meta')
    assert search.epsanet_params(layers, mult, mult, groups) == count_params(model)


def test_closed_form_count_matches_other_widths():
    model = timm.create_model('epsanet50_small', base_width=96, block_args=dict(psa_groups=(1, 2, 4, 8)), device='meta')
    assert search.epsanet_params((3, 4, 6, 3), 1.5, 1.5, (1, 2, 4, 8)) == count_params(model)
    assert search.epsanet_params((3, 4, 6, 3), 1, 1, (64, 1, 1, 1)) is None  # 16 channels / 64 groups


def test_no_configuration_reproduces_table2_large():
    best = search.search(top=50)
    assert best and not any(search.reproduces(p50, p101) for *_, p50, p101 in best)
    # the search itself can recognise a match: the Small variants reproduce their Table 2 row
    assert (round(search.epsanet_params((3, 4, 6, 3), 1, 1, (1, 4, 8, 16)) / 1e6, 2)) == 22.56
