"""ONNX export with both of torch's exporters (TorchScript-based, as timm's onnx_export.py uses,
and dynamo): onnxruntime gives the eager logits, the batch axis stays dynamic, and the graph
holds the fast branch forms the model runs on CPU, not plain grouped convs."""
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch

import timm_epsanet  # noqa: F401

VARIANTS = timm.list_models('epsanet*')
SMALLEST = 'epsanet50_small'


def export(model, path, dynamo: bool, size: int = 64):
    x = torch.randn(2, 3, size, size)
    if dynamo:
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},))
    else:  # as timm's onnx_export.py calls it
        with warnings.catch_warnings():
            # no Python branch on a traced size: its export would warn that it may not generalize
            warnings.simplefilter('error', torch.jit.TracerWarning)
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, input_names=['input0'], output_names=['output0'],
                dynamic_axes={'input0': {0: 'batch_size'}, 'output0': {0: 'batch_size'}})
    return path


def assert_runs_like_pytorch(model, path, size: int = 64):
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    for batch in (1, 3):  # the batch axis stays dynamic
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            expected = model(x).numpy()
        got, = session.run(None, {input_name: x.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def conv_kinds(path) -> Counter:
    """Conv nodes by (kernel rank, group count): what the branch forms look like in ONNX."""
    kinds = Counter()
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == 'Conv':
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            kinds[len(attrs.get('kernel_shape', ())), attrs.get('group', 1)] += 1
    return kinds


def computed_conv_weights(path) -> list:
    """Conv nodes whose weight is computed when the graph runs, not a constant: onnxruntime
    cannot prepack those, and runs them several times slower."""
    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer}
    for n in graph.node:  # in graph order: a constant, or an identity of one
        if n.op_type == 'Constant' or (n.op_type == 'Identity' and n.input[0] in constants):
            constants.update(n.output)
    return [n.name for n in graph.node if n.op_type == 'Conv' and n.input[1] not in constants]


@pytest.mark.parametrize('name', VARIANTS)
def test_torchscript_onnx_export_matches_pytorch(name, tmp_path):
    """timm's onnx_export.py exports with autograd on; no_grad must work as well."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    grad_modes = (True, False) if name == SMALLEST else (True,)
    for grad in grad_modes:
        with torch.set_grad_enabled(grad):
            path = export(model, tmp_path / f'{name}-{grad}.onnx', dynamo=False, size=32)
        assert_runs_like_pytorch(model, path, size=32)
        assert not computed_conv_weights(path)


def test_dynamo_export_matches_pytorch_and_the_torchscript_export(tmp_path):
    """The dynamo export (slow: the smallest variant only) runs like PyTorch; both exporters
    export the same convs: the fast forms, not the grouped convs of branch_form='grouped'."""
    torch.manual_seed(0)
    model = timm.create_model(SMALLEST).eval()
    with torch.no_grad():
        dynamo = export(model, tmp_path / 'dynamo.onnx', dynamo=True)
    assert_runs_like_pytorch(model, dynamo)
    torchscript = conv_kinds(export(model, tmp_path / 'torchscript.onnx', dynamo=False))
    assert torchscript == conv_kinds(dynamo)
    grouped = timm.create_model(SMALLEST, block_args=dict(psa_branch_form='grouped')).eval()
    assert torchscript != conv_kinds(export(grouped, tmp_path / 'grouped.onnx', dynamo=False))
    assert torchscript[3, 16] > 0, 'no volumetric form (Conv3D) in the export'
