"""Official-script and train.py checkpoints -> this package's weights: exact, safe, clear errors."""
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_epsanet  # noqa: F401
from timm_epsanet._official import OfficialEPSANet, save_official_checkpoint as save_official
from timm_epsanet.convert import (
    CheckpointError, check_compatible, checkpoint_filter_fn, convert_official, detect_variant, read_checkpoint)


@pytest.fixture(scope='module')
def official(trained_bn):
    torch.manual_seed(0)
    return trained_bn(OfficialEPSANet()).eval()


def test_official_checkpoint_converts_exactly(official, tmp_path):
    path = save_official(official, tmp_path / 'model_best.pth.tar')
    ours = timm.create_model('epsanet50_small').eval()
    ours.load_state_dict(read_checkpoint(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)
        # and through timm's pretrained machinery (checkpoint_filter_fn), bare state dict too
        for file in (path, save_official(official, tmp_path / 'bare.pth', bare=True)):
            via_timm = timm.create_model('epsanet50_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
            torch.testing.assert_close(via_timm.eval()(x), official(x), rtol=1e-5, atol=1e-5)
            assert 'state_dict' not in via_timm.pretrained_cfg  # no second copy of the weights kept
        # timm's own checkpoint loader, with this package's filter
        fresh = timm.create_model('epsanet50_small').eval()
        timm.models.load_checkpoint(fresh, str(path), filter_fn=checkpoint_filter_fn)
        torch.testing.assert_close(fresh(x), official(x), rtol=1e-5, atol=1e-5)


def test_loaders_without_the_filter_take_official_checkpoints(official, tmp_path):
    # timm's validate.py --checkpoint and train.py --initial-checkpoint call load_checkpoint without
    # a filter; a user may call load_state_dict on the official state dict itself
    path = save_official(official, tmp_path / 'model_best.pth.tar')
    x = torch.randn(2, 3, 64, 64)
    via_loader = timm.create_model('epsanet50_small').eval()
    timm.models.load_checkpoint(via_loader, str(path))
    direct = timm.create_model('epsanet50_small').eval()
    source = official.state_dict()
    keys = list(source)
    direct.load_state_dict(source)
    assert list(source) == keys  # the caller's dict is left as it was
    with torch.no_grad():
        torch.testing.assert_close(via_loader(x), official(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(direct(x), official(x), rtol=1e-5, atol=1e-5)
    # under another prefix: a backbone inside a detector
    detector = torch.nn.ModuleDict({'body': timm.create_model('epsanet50_small', features_only=True)}).eval()
    detector.load_state_dict({f'body.{k}': v for k, v in source.items() if not k.startswith('fc.')})
    with torch.no_grad():
        torch.testing.assert_close(detector['body'](x)[-1], via_loader.forward_features(x), rtol=1e-5, atol=1e-5)


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
    torch.save({'epoch': 3, 'arch': 'epsanet50_small', 'state_dict': {f'_orig_mod.{k}': v for k, v in model.state_dict().items()},
                'state_dict_ema': {f'module.{k}': v for k, v in ema.state_dict().items()}}, tmp_path / 'last.pth.tar')
    raw = read_checkpoint(tmp_path / 'last.pth.tar')
    with_ema = read_checkpoint(tmp_path / 'last.pth.tar', use_ema=True)
    key = 'layer2.1.conv2.convs.2.weight'
    assert torch.equal(raw[key], model.state_dict()[key]) and torch.equal(with_ema[key], ema.state_dict()[key])
    # as pretrained weights the EMA ones, as timm's loader takes them (resnet50's too), and by its own loader
    pretrained = timm.create_model('epsanet50_small', pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / 'last.pth.tar')))
    loaded = timm.create_model('epsanet50_small', checkpoint_path=str(tmp_path / 'last.pth.tar'))
    assert torch.equal(pretrained.state_dict()[key], ema.state_dict()[key])
    assert torch.equal(loaded.state_dict()[key], ema.state_dict()[key])
    # asking for EMA weights a checkpoint does not have is an error, not a silent fallback
    torch.save({'epoch': 3, 'state_dict': model.state_dict()}, tmp_path / 'no_ema.pth.tar')
    with pytest.raises(CheckpointError, match='has no EMA weights') as info:
        read_checkpoint(tmp_path / 'no_ema.pth.tar', use_ema=True)
    assert str(tmp_path / 'no_ema.pth.tar') in str(info.value) and 'state_dict (dict of' in str(info.value)
    pretrained = timm.create_model('epsanet50_small', pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / 'no_ema.pth.tar')))
    assert torch.equal(pretrained.state_dict()[key], model.state_dict()[key])  # without EMA: its weights


def test_wrong_architecture_is_named(tmp_path):
    large = timm.create_model('epsanet50_large')
    torch.save({'state_dict': large.state_dict()}, tmp_path / 'large.pth.tar')
    with pytest.raises(CheckpointError) as info:
        check_compatible(read_checkpoint(tmp_path / 'large.pth.tar'), timm.create_model('epsanet50_small'),
                         str(tmp_path / 'large.pth.tar'))
    msg = str(info.value)
    assert str(tmp_path / 'large.pth.tar') in msg and 'looks like epsanet50_large' in msg and 'shape mismatches' in msg
    with pytest.raises(CheckpointError, match='looks like epsanet50_large'):
        timm.create_model('epsanet50_small', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'large.pth.tar')))


def test_missing_and_unexpected_keys(official, tmp_path):
    state_dict = convert_official(official.state_dict())
    del state_dict['layer4.2.bn3.running_var']
    state_dict['layer5.0.conv1.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        check_compatible(state_dict, timm.create_model('epsanet50_small'), 'edited.pth')
    assert '1 missing keys: layer4.2.bn3.running_var' in str(info.value)
    assert '1 unexpected keys: layer5.0.conv1.weight' in str(info.value)


def test_unreadable_files(official, tmp_path):
    path = save_official(official, tmp_path / 'checkpoint.pth.tar')
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    broken_safetensors = tmp_path / 'model.safetensors'
    broken_safetensors.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}\x00\x00\x00\x00\x00\x00\x00')
    for bad in (truncated, broken_safetensors):
        with pytest.raises(CheckpointError, match='not a readable checkpoint') as info:
            read_checkpoint(bad)
        assert str(bad) in str(info.value)
    cases = {
        'notes.pth': (b'not a checkpoint', 'neither a PyTorch file'),
        'photo.pth': (b'\xff\xd8\xff\xe0\x00\x10JFIF' + bytes(100), 'not a checkpoint, it is a JPEG image'),
        'empty.pth': (b'', 'is empty (0 bytes)'),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            read_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match='no such file'):
        read_checkpoint(tmp_path / 'absent.pth')
    with pytest.raises(CheckpointError, match='is a directory, not a checkpoint file'):
        read_checkpoint(tmp_path)
    torch.save({'epoch': 1}, tmp_path / 'epoch_only.pth')
    with pytest.raises(CheckpointError, match=r'holds no tensors .* its entries: epoch \(int\)'):
        read_checkpoint(tmp_path / 'epoch_only.pth')
    torch.save({'net': {'conv1.weight': torch.zeros(1)}}, tmp_path / 'nested.pth')
    with pytest.raises(CheckpointError, match=r'net \(dict of 1 tensors\)'):
        read_checkpoint(tmp_path / 'nested.pth')


def test_format_comes_from_the_content(official, tmp_path):
    """A safetensors file named .pth, and a flat state dict with an extra optimizer entry, both load."""
    import safetensors.torch
    state_dict = convert_official(official.state_dict())
    safetensors.torch.save_file(state_dict, tmp_path / 'weights.pth')
    torch.save(state_dict, tmp_path / 'weights.safetensors')
    torch.save(dict(state_dict, optimizer={'state': {}, 'param_groups': []}, epoch=3), tmp_path / 'flat.pth')
    for name in ('weights.pth', 'weights.safetensors', 'flat.pth'):
        loaded = read_checkpoint(tmp_path / name)
        assert loaded.keys() == state_dict.keys() and torch.equal(loaded['fc.weight'], state_dict['fc.weight'])


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_non_finite_weights_are_refused(official, tmp_path, value):
    state_dict = convert_official(official.state_dict())
    state_dict['layer3.1.conv2.convs.2.weight'][0, 0, 0, 0] = value
    state_dict['bn1.running_var'][3] = value
    torch.save({'state_dict': state_dict}, tmp_path / 'diverged.pth.tar')
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / 'diverged.pth.tar')
    message = str(info.value)
    assert str(tmp_path / 'diverged.pth.tar') in message and '2 tensor(s) hold NaN or Inf' in message
    assert 'bn1.running_var' in message and 'layer3.1.conv2.convs.2.weight' in message
    with pytest.raises(CheckpointError, match='hold NaN or Inf'):  # the file overlay
        timm.create_model('epsanet50_small', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'diverged.pth.tar')))
    with pytest.raises(CheckpointError, match='hold NaN or Inf'):  # a state dict passed directly
        timm.create_model('epsanet50_small', pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict))


@pytest.fixture(scope='module')
def finetuned10(tmp_path_factory):
    torch.manual_seed(1)
    model = timm.create_model('epsanet50_small', num_classes=10).eval()
    path = tmp_path_factory.mktemp('ft') / 'finetuned10.pth'
    torch.save(model.state_dict(), path)
    return path, model


def test_finetuned_head_is_kept(finetuned10):
    path, source = finetuned10
    model = timm.create_model('epsanet50_small', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(model.fc.weight, source.fc.weight) and torch.equal(model.fc.bias, source.fc.bias)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    # another num_classes asks for a new head (timm's rule); the backbone still loads
    other = timm.create_model('epsanet50_small', pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path)))
    assert other.fc.out_features == 5 and torch.equal(other.conv1.weight, source.conv1.weight)
    features = timm.create_model('epsanet50_small', pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(features.conv1.weight, source.conv1.weight)


def test_finetuned_head_into_the_default_model_says_which_num_classes(finetuned10):
    path, source = finetuned10
    with pytest.raises(CheckpointError) as info:
        timm.create_model('epsanet50_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert str(path) in str(info.value) and 'num_classes=10' in str(info.value)
    with pytest.raises(CheckpointError, match='num_classes=10'):  # timm's loader with this package's filter
        timm.models.load_checkpoint(timm.create_model('epsanet50_small'), str(path), filter_fn=checkpoint_filter_fn)

@pytest.mark.parametrize('in_chans', [1, 4])
def test_pretrained_weights_adapt_to_the_input_channels(finetuned10, in_chans):
    # grayscale or multispectral fine-tuning from RGB weights, as resnet50's: timm sums the first
    # conv's filters over RGB for one channel and repeats them for more; the rest loads unchanged
    path, source = finetuned10
    expected = timm.models.adapt_input_conv(in_chans, source.conv1.weight.detach())
    for kwargs in (dict(num_classes=10), dict(features_only=True)):
        model = timm.create_model('epsanet50_small', pretrained=True, in_chans=in_chans,
                                  pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
        assert torch.equal(model.conv1.weight, expected)
        assert torch.equal(model.layer2[0].conv2.convs[3].weight, source.layer2[0].conv2.convs[3].weight)
        with torch.no_grad():
            model(torch.randn(1, in_chans, 64, 64))
    if in_chans == 1:
        torch.testing.assert_close(expected, source.conv1.weight.sum(dim=1, keepdim=True))


def test_first_conv_that_cannot_adapt_is_named(finetuned10, tmp_path):
    path, source = finetuned10
    gray = {k: v.sum(dim=1, keepdim=True) if k == 'conv1.weight' else v for k, v in source.state_dict().items()}
    gray_path = tmp_path / 'gray.pth'
    torch.save(gray, gray_path)
    # a one-channel checkpoint into the RGB model: no rule adapts it
    with pytest.raises(CheckpointError, match=r'gray\.pth.*conv1\.weight: checkpoint \(64, 1, 7, 7\), model \(64, 3, 7, 7\)'):
        timm.create_model('epsanet50_small', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(gray_path)))
    # timm's load_checkpoint adapts nothing: the filter names the mismatch there too
    with pytest.raises(CheckpointError, match='conv1.weight: checkpoint'):
        timm.models.load_checkpoint(
            timm.create_model('epsanet50_small', num_classes=10, in_chans=1), str(path), filter_fn=checkpoint_filter_fn)


def test_a_classifier_timm_keeps_must_fit(finetuned10, tmp_path):
    """Where the model has the checkpoint's classes timm keeps its classifier, so each way it can
    differ is named with the file, not left to torch's size mismatch or missing keys."""
    path, source = finetuned10
    # the same classes on wider pooled features (catavgmax doubles them)
    with pytest.raises(CheckpointError, match=r'finetuned10\.pth.*fc\.weight: checkpoint \(10, 2048\), model \(10, 4096\)'):
        timm.create_model('epsanet50_small', pretrained=True, num_classes=10, global_pool='catavgmax',
                          pretrained_cfg_overlay=dict(file=str(path)))
    model = timm.create_model('epsanet50_small', pretrained=True, num_classes=5, global_pool='catavgmax',
                              pretrained_cfg_overlay=dict(file=str(path)))  # a new classifier: loads
    assert model.fc.in_features == 4096
    # a backbone's weights, without a classifier, into a model that keeps one
    backbone = tmp_path / 'backbone.pth'
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith('fc.')}, backbone)
    with pytest.raises(CheckpointError, match=r'backbone\.pth: holds no classifier.*num_classes=0'):
        timm.create_model('epsanet50_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(backbone)))
    for kwargs in (dict(num_classes=0), dict(num_classes=7), dict(features_only=True)):
        model = timm.create_model('epsanet50_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(backbone)), **kwargs)
        assert torch.equal(model.layer4[2].conv3.weight, source.layer4[2].conv3.weight)


def test_pretrained_strict_false_loads_what_fits(finetuned10, tmp_path):
    # timm's pretrained_strict=False (transfer from a checkpoint of another architecture) loads the
    # tensors that fit by name, as for resnet50; shapes that differ are still refused
    _, source = finetuned10
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith(('layer4.', 'fc.'))}
    partial['head.extra.weight'] = torch.zeros(3)
    path = tmp_path / 'partial.pth'
    torch.save(partial, path)
    with pytest.raises(CheckpointError, match=r'partial\.pth: does not fit the model\. \d+ missing keys: layer4'):
        timm.create_model('epsanet50_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model = timm.create_model('epsanet50_small', pretrained=True, pretrained_strict=False,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.layer3[5].conv2.convs[3].weight, source.layer3[5].conv2.convs[3].weight)
    assert not torch.equal(model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    partial['layer1.0.conv2.convs.1.weight'] = torch.zeros(4, 4, 5, 5)
    torch.save(partial, path)
    with pytest.raises(CheckpointError, match=r'layer1\.0\.conv2\.convs\.1\.weight: checkpoint \(4, 4, 5, 5\)'):
        timm.create_model('epsanet50_small', pretrained=True, pretrained_strict=False,
                          pretrained_cfg_overlay=dict(file=str(path)))


class _Payload:
    def __reduce__(self):
        return (open, ('/tmp/timm_epsanet_pwned', 'w'))


def test_pickled_code_never_runs(tmp_path):
    marker = '/tmp/timm_epsanet_pwned'
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}, 'x': _Payload()}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(CheckpointError, match='pickled Python objects') as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and not os.path.exists(marker)


def test_unpublished_weights_fail_clearly():
    with pytest.raises(RuntimeError) as info:
        timm.create_model('epsanet101_large', pretrained=True)
    msg = str(info.value)
    assert 'No pretrained weights are published for epsanet101_large' in msg and 'pretrained_cfg_overlay=dict(file=' in msg
    recipe = msg.split('--config ')[1].split(')')[0]  # the recipe it points to is there to use
    assert recipe.endswith('imagenet_paper.yaml') and Path(recipe).is_file()


def test_pretrained_listing_follows_publication():
    """timm.list_models(pretrained=True) lists a variant only once its weights exist somewhere."""
    assert timm.list_models('epsanet*', pretrained=True) == []
    code = 'import timm, timm_epsanet; print(",".join(timm.list_models("epsanet*", pretrained=True)))'
    env = dict(os.environ, TIMM_EPSANET_HUB_ORG='someorg')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert set(out.stdout.strip().split(',')) == {f'{name}.in1k' for name in timm.list_models('epsanet*')}
