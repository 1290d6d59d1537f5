""" CUDA AMP training keeps PSA's activations in the autocast dtype, and Small's activation memory
near resnet50's. Counted on fake CUDA tensors (no GPU): benchmarks/training_memory.py. """
import pytest
import torch

from benchmarks.training_memory import _CudaAutocast, main, saved_activation_bytes
from timm_epsanet import PyramidSqueezeAttention


def _fake_cuda_runs() -> bool:
    """Whether this torch runs a PSA on fake CUDA tensors without a GPU (2.8's asks the driver)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    try:
        with FakeTensorMode():
            psa = PyramidSqueezeAttention(8, kernel_sizes=(3, 5), groups=(1, 2), device='cuda').train()
            psa(torch.empty(2, 8, 4, 4, device='cuda'))
    except RuntimeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _fake_cuda_runs(), reason=f'torch {torch.__version__} needs a GPU for fake CUDA tensors')


def test_psa_output_keeps_the_autocast_dtype_on_cuda():
    """CUDA autocast runs the softmax in fp32; the reweighted output must not be promoted to it
    (the BN and activation after PSA would then run in fp32 too)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for amp_dtype in (torch.float16, torch.bfloat16):
        with FakeTensorMode():
            psa = PyramidSqueezeAttention(64, device='cuda').train()
            x = torch.empty(2, 64, 8, 8, device='cuda')
            with _CudaAutocast(amp_dtype):
                y = psa(x)
        assert y.dtype == amp_dtype
    assert not torch.is_autocast_enabled('cuda')


def test_small_saves_at_most_1_1x_resnet50_activations():
    """Issue 14's memory target (<= 1.1x resnet50's training peak), for the part the model owns."""
    small = saved_activation_bytes('epsanet50_small', batch_size=8, img_size=224)
    resnet = saved_activation_bytes('resnet50', batch_size=8, img_size=224)
    assert small <= 1.1 * resnet, small / resnet


def test_table_and_csv(tmp_path, capsys):
    out = tmp_path / 'memory.csv'
    rows = main(['--models', 'epsanet50_small', '--batch-size', '2', '--img-size', '64', '--out', str(out)])
    assert [r['model'] for r in rows] == ['resnet50', 'epsanet50_small'] and rows[0]['x_resnet50'] == 1.0
    assert rows[1]['x_resnet50'] == pytest.approx(rows[1]['saved_mib'] / rows[0]['saved_mib'], rel=1e-2)
    header = out.read_text().splitlines()[0]
    assert header.startswith('model,amp_dtype,batch_size') and header.endswith('machine,date')
    assert '| epsanet50_small |' in capsys.readouterr().out
