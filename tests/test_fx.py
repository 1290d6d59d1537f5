"""FX: timm's and torchvision's feature extraction trace every variant, and the traced graphs
compute what the eager model computes, in train and eval mode, with and without autograd."""
import copy

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor as tv_create_feature_extractor

import timm_epsanet  # noqa: F401
from timm_epsanet._branch_conv import BranchConvs

NAME = 'epsanet50_small'  # the smallest variant; every variant is traced in test_every_variant_traces
NODES = ['layer1', 'layer4']


def _extractors(model):
    """The three ways a user gets an FX feature extractor, each on its own copy of `model`."""
    return {
        'timm create_feature_extractor': timm.models.create_feature_extractor(copy.deepcopy(model), NODES),
        'torchvision create_feature_extractor': tv_create_feature_extractor(copy.deepcopy(model), NODES),
    }


def _eager_features(model, x):
    layer1, layer4 = model.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    return {'layer1': layer1, 'layer4': layer4}


@pytest.mark.parametrize('train', [False, True])
def test_feature_extractors_match_eager(train):
    torch.manual_seed(0)
    model = timm.create_model(NAME).train(train)
    x = torch.randn(2, 3, 32, 32)
    for how, extractor in _extractors(model).items():
        assert extractor.training == train, how
        eager = copy.deepcopy(model)  # train mode updates BN statistics: a fresh copy per comparison
        with torch.no_grad():
            expected = _eager_features(eager, x)
            got = extractor(x)
        for node in NODES:
            torch.testing.assert_close(got[node], expected[node], msg=f'{how}, {node}')


@pytest.mark.parametrize('train', [False, True])
def test_features_only_fx_matches_hooks(train):
    torch.manual_seed(0)
    fx = timm.create_model(NAME, features_only=True, feature_cls='fx').train(train)
    torch.manual_seed(0)
    ref = timm.create_model(NAME, features_only=True).train(train)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, expected = fx(x), ref(x)
    assert len(got) == len(expected) == 5
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_traced_graph_trains_like_eager():
    """Grad mode is read when a graph is traced; a graph traced under no_grad (as detection code
    often does) must still give the eager model's outputs and gradients when it trains."""
    torch.manual_seed(0)
    model = timm.create_model(NAME).train()
    with torch.no_grad():
        extractors = _extractors(model)
    x = torch.randn(2, 3, 32, 32)
    eager = copy.deepcopy(model)
    expected = _eager_features(eager, x)['layer4']
    expected.square().mean().backward()
    expected_grads = dict(eager.named_parameters())
    for how, extractor in extractors.items():
        got = extractor(x)['layer4']
        got.square().mean().backward()
        torch.testing.assert_close(got, expected, msg=how)
        for name, p in extractor.named_parameters():
            torch.testing.assert_close(p.grad, expected_grads[name].grad, msg=f'{how}: grad of {name}')


def test_timm_graph_keeps_the_fast_branch_forms():
    """timm's tracer keeps each PSA's branches as one module (a leaf), planned per call."""
    model = timm.create_model(NAME)
    graph = timm.models.create_feature_extractor(model, ['layer1']).graph
    leaves = [n.target for n in graph.nodes if n.op == 'call_module' and n.target.endswith('conv2.convs')]
    assert leaves == ['layer1.0.conv2.convs', 'layer1.1.conv2.convs', 'layer1.2.conv2.convs']
    assert isinstance(model.get_submodule(leaves[0]), BranchConvs)


@pytest.mark.parametrize('name', timm.list_models('epsanet*'))
def test_every_variant_traces(name):
    """Tracing runs no tensor math: on the meta device it checks every variant at no cost."""
    model = timm.create_model(name, device='meta').eval()
    for trace in (timm.models.create_feature_extractor, tv_create_feature_extractor):
        graph_module = trace(model, NODES)
        assert list(graph_module(torch.empty(1, 3, 64, 64, device='meta'))) == NODES
    assert not model.training  # the trace hands the model back in its mode
