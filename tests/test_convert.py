"""Official-script and train.py checkpoints -> this package's weights: exact, safe, clear errors."""
import os
import pickle
import subprocess
import sys

import pytest
import timm
import torch

import timm_epsanet  # noqa: F401
from timm_epsanet._official import OfficialEPSANet
from timm_epsanet.convert import CheckpointError, convert_official, detect_variant, load_checkpoint

@pytest.fixture(scope='module')
def official(trained_bn):
    torch.manual_seed(0)
    return trained_bn(OfficialEPSANet()).eval()


def save_official(model, path, bare=False):
    """As the official main.py saves it: DataParallel prefixes, epoch, arch, best_prec1, optimizer."""
    state_dict = {f'module.{k}': v for k, v in model.state_dict().items()}
    if bare:
        torch.save(state_dict, path)
        return path
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer state
    model.zero_grad()
    torch.save({'epoch': 100, 'arch': 'epsanet50', 'state_dict': state_dict, 'best_prec1': torch.tensor(77.49),
                'optimizer': optimizer.state_dict()}, path)
    return path


def test_official_checkpoint_converts_exactly(official, tmp_path):
    path = save_official(official, tmp_path / 'model_best.pth.tar')
    ours = timm.create_model('epsanet50_small').eval()
    ours.load_state_dict(load_checkpoint(path, ours))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)
        # and through timm's pretrained machinery (our pretrained_filter_fn), bare state dict too
        for file in (path, save_official(official, tmp_path / 'bare.pth', bare=True)):
            via_timm = timm.create_model('epsanet50_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
            torch.testing.assert_close(via_timm.eval()(x), official(x), rtol=1e-5, atol=1e-5)


def test_conversion_is_a_rename_and_permutation(official):
    src = official.state_dict()
    out = convert_official(src)
    assert 'layer1.0.conv2.convs.3.weight' in out and not any('conv_' in k for k in out)
    assert torch.equal(out['layer1.0.conv2.convs.0.weight'], src['layer1.0.conv2.conv_1.weight'])
    # branch 0's BN channels come from the LAST quarter of the official ones
    torch.testing.assert_close(out['layer1.0.bn2.weight'][:16], src['layer1.0.bn2.weight'][48:])
    assert sorted(v.numel() for v in out.values()) == sorted(v.numel() for v in src.values())
    assert detect_variant(out) == 'epsanet50_small'


def test_train_py_checkpoint_with_ema(tmp_path):
    torch.manual_seed(0)
    model, ema = timm.create_model('epsanet50_small'), timm.create_model('epsanet50_small')
    torch.save({'epoch': 3, 'arch': 'epsanet50_small', 'state_dict': model.state_dict(),
                'state_dict_ema': {f'module.{k}': v for k, v in ema.state_dict().items()}}, tmp_path / 'last.pth.tar')
    raw = load_checkpoint(tmp_path / 'last.pth.tar', model)
    with_ema = load_checkpoint(tmp_path / 'last.pth.tar', model, use_ema=True)
    key = 'layer2.1.conv2.convs.2.weight'
    assert torch.equal(raw[key], model.state_dict()[key]) and torch.equal(with_ema[key], ema.state_dict()[key])


def test_wrong_architecture_is_named(tmp_path):
    large = timm.create_model('epsanet50_large')
    torch.save({'state_dict': large.state_dict()}, tmp_path / 'large.pth.tar')
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / 'large.pth.tar', timm.create_model('epsanet50_small'))
    msg = str(info.value)
    assert str(tmp_path / 'large.pth.tar') in msg and 'looks like epsanet50_large' in msg and 'shape mismatches' in msg
    with pytest.raises(CheckpointError, match='looks like epsanet50_large'):
        timm.create_model('epsanet50_small', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'large.pth.tar')))


def test_missing_and_unexpected_keys(official, tmp_path):
    state_dict = convert_official(official.state_dict())
    del state_dict['layer4.2.bn3.running_var']
    state_dict['layer5.0.conv1.weight'] = torch.zeros(1)
    torch.save(state_dict, tmp_path / 'edited.pth')
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / 'edited.pth', timm.create_model('epsanet50_small'))
    assert '1 missing keys: layer4.2.bn3.running_var' in str(info.value)
    assert '1 unexpected keys: layer5.0.conv1.weight' in str(info.value)


def test_unreadable_files(official, tmp_path):
    path = save_official(official, tmp_path / 'checkpoint.pth.tar')
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    broken_safetensors = tmp_path / 'model.safetensors'
    broken_safetensors.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    for bad in (truncated, text, broken_safetensors):
        with pytest.raises(CheckpointError, match='not a readable checkpoint') as info:
            load_checkpoint(bad)
        assert str(bad) in str(info.value)
    with pytest.raises(CheckpointError, match='no such file'):
        load_checkpoint(tmp_path / 'absent.pth')
    torch.save({'epoch': 1}, tmp_path / 'empty.pth')
    with pytest.raises(CheckpointError, match='holds no state dict of tensors'):
        load_checkpoint(tmp_path / 'empty.pth')


class _Payload:
    def __reduce__(self):
        return (open, ('/tmp/timm_epsanet_pwned', 'w'))


def test_pickled_code_never_runs(tmp_path):
    import os
    marker = '/tmp/timm_epsanet_pwned'
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}, 'x': _Payload()}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        load_checkpoint(path)
    assert not os.path.exists(marker)


def test_unpublished_weights_fail_clearly():
    with pytest.raises(RuntimeError) as info:
        timm.create_model('epsanet101_large', pretrained=True)
    msg = str(info.value)
    assert 'No pretrained weights are published for epsanet101_large' in msg
    assert 'recipes/imagenet_paper.yaml' in msg and 'pretrained_cfg_overlay=dict(file=' in msg


def test_pretrained_listing_follows_publication():
    """timm.list_models(pretrained=True) lists a variant only once its weights exist somewhere."""
    assert timm.list_models('epsanet*', pretrained=True) == []
    code = 'import timm, timm_epsanet; print(",".join(timm.list_models("epsanet*", pretrained=True)))'
    env = dict(os.environ, TIMM_EPSANET_HUB_ORG='someorg')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert set(out.stdout.strip().split(',')) == {
        'epsanet50_small.in1k', 'epsanet50_large.in1k', 'epsanet101_small.in1k', 'epsanet101_large.in1k'}
