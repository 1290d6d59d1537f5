"""Export: ONNX (checked with onnxruntime) and torch.compile give the eager logits."""
import numpy as np
import onnxruntime
import pytest
import timm
import torch

import timm_epsanet  # noqa: F401
from tests.test_models import VARIANTS


@pytest.mark.parametrize('name', VARIANTS)
def test_onnx_export_matches_pytorch(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / f'{name}.onnx'
    with torch.no_grad():  # the inference graph (PSA's depthwise form where it applies)
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},))
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    for batch in (2, 3):  # the batch axis stays dynamic
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        got, = session.run(None, {input_name: x.numpy()})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
