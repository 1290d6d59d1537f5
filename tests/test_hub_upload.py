"""hub_upload: checkpoints -> validated Hub folders (safetensors, timm config, model card), pushed with timm.

A failure writes no folder, leaves no temporary folder, and says in one line what went wrong.
"""
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import markdown
import pytest
import timm
import torch
from huggingface_hub import ModelCard

import timm_epsanet  # noqa: F401
from timm_epsanet._official import OfficialEPSANet, save_official_checkpoint as save_official
from timm_epsanet.hub_upload import export
from timm_epsanet.hub_upload.__main__ import main

NAME = 'epsanet50_small.in1k'


@pytest.fixture(scope='module')
def official_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = OfficialEPSANet().eval()
    return save_official(model, tmp_path_factory.mktemp('ckpt') / 'model_best.pth.tar'), model


@pytest.fixture(scope='module')
def dry_run(official_checkpoint, tmp_path_factory):
    """One dry run with measured accuracy, and what it printed."""
    path, _ = official_checkpoint
    out = tmp_path_factory.mktemp('out')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([f'epsanet50_small={path}', '--out', str(out), '--top1', '77.1', '--top5', '93.4']) == 0
    return out, printed.getvalue()


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_dry_run_writes_a_valid_hub_folder(official_checkpoint, dry_run):
    _, official = official_checkpoint
    out, printed = dry_run
    assert '3/4 validating' in printed and 'dry run' in printed
    folder = out / NAME
    assert _entries(out) == [NAME]  # no temporary folder left
    assert _entries(folder) == ['README.md', 'config.json', 'model.safetensors']

    raw = (folder / 'model.safetensors').read_bytes()  # safetensors: 8-byte header length, JSON, tensors
    header_len, = struct.unpack('<Q', raw[:8])
    assert json.loads(raw[8:8 + header_len])['layer1.0.conv2.convs.0.weight']['shape'] == [16, 64, 3, 3]

    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'epsanet50_small' and config['num_classes'] == 1000
    assert config['num_features'] == 2048 and len(config['label_names']) == 1000
    assert config['pretrained_cfg']['mean'] == list(timm.data.IMAGENET_DEFAULT_MEAN)

    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), official(x), rtol=1e-5, atol=1e-5)


def test_model_card(dry_run):
    out, _ = dry_run
    text = (out / NAME / 'README.md').read_text()
    card = ModelCard(text)
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert card.data.license == 'apache-2.0' and card.data.datasets == ['imagenet-1k']
    assert card.data.tags == ['image-classification', 'timm', 'epsanet', 'pyramid-squeeze-attention']
    for needle in ('Params (M): 22.56', 'GMACs: 3.60', 'Activations (M)', '224 x 224',
                   'Reported by the paper (Table 2), not measured on these weights', 'top-1 77.49%',
                   'ImageNet-1k val (measured on these weights):** top-1 77.10%, top-5 93.40%',
                   'largest absolute difference 0.0e+00',
                   'official training script checkpoint', 'reverse order', 'features_only=True',
                   'num_classes=0', '@inproceedings{zhang2022epsanet', 'not on PyPI yet'):
        assert needle in text, needle
    html = markdown.markdown(card.text, extensions=['fenced_code'])
    assert html.count('<pre><code class="language-python">') == 3 and '<code class="language-bibtex">' in html
    assert '<h2>Model Usage</h2>' in html and '<h2>Citation</h2>' in html


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def test_failures_leave_nothing(official_checkpoint, tmp_path, capsys):
    path, _ = official_checkpoint
    assert main([f'epsanet50_large={path}', '--out', str(tmp_path)]) == 2  # a Small checkpoint
    err = _one_error_line(capsys)
    assert str(path) in err and 'looks like epsanet50_small' in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 0
    assert '(measured on these weights)' not in (tmp_path / NAME / 'README.md').read_text()  # none given
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 2
    assert 'pass --overwrite' in _one_error_line(capsys)
    with pytest.raises(SystemExit):
        main(['resnet50=x.pth'])


def test_bad_checkpoints_are_named(official_checkpoint, dry_run, tmp_path, capsys):
    """No EMA weights for --ema, a missing file, an image, NaN weights: one line each, nothing written,
    and a published folder is never replaced by them."""
    path, official = official_checkpoint
    out = tmp_path / 'out'
    shutil.copytree(dry_run[0] / NAME, out / NAME)
    published = (out / NAME / 'model.safetensors').read_bytes()
    (tmp_path / 'photo.jpg').write_bytes(b'\xff\xd8\xff\xe0\x00\x10JFIF' + bytes(64))
    state_dict = {f'module.{k}': v.clone() for k, v in official.state_dict().items()}
    state_dict['module.layer4.0.bn3.weight'][0] = float('nan')
    torch.save({'state_dict': state_dict}, tmp_path / 'nan.pth')
    cases = [
        ([f'epsanet50_small={path}', '--ema'], 'has no EMA weights'),
        ([f'epsanet50_small={tmp_path / "absent.pth"}'], 'absent.pth: no such file'),
        ([f'epsanet50_small={tmp_path / "photo.jpg"}'], 'not a checkpoint, it is a JPEG image'),
        ([f'epsanet50_small={tmp_path / "nan.pth"}'], 'layer4.0.bn3.weight'),
    ]
    for args, message in cases:
        assert main(args + ['--out', str(out), '--overwrite']) == 2
        err = _one_error_line(capsys)
        assert message in err and 'nothing was written' in err, err
        assert _entries(out) == [NAME] and (out / NAME / 'model.safetensors').read_bytes() == published


def test_validation_refuses_nan(monkeypatch, official_checkpoint, tmp_path, capsys):
    """Finite weights whose logits are NaN (here: a reload that gives NaN) fail validation."""
    path, _ = official_checkpoint
    create = timm.create_model

    def reload_gives_nan(name, *args, **kwargs):
        model = create(name, *args, **kwargs)
        if name.startswith('local-dir:'):
            with torch.no_grad():
                model.fc.bias.fill_(float('nan'))
        return model
    monkeypatch.setattr(timm, 'create_model', reload_gives_nan)
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 2
    assert 'validation failed: reloaded logits differ by nan' in _one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_several_variants_all_or_nothing(official_checkpoint, tmp_path, capsys):
    path, _ = official_checkpoint
    assert main([f'epsanet50_small={path}', f'epsanet50_large={path}', '--out', str(tmp_path)]) == 2
    assert 'nothing was written' in _one_error_line(capsys)
    assert not any(tmp_path.iterdir())  # the Small folder, validated first, is not left behind


def test_file_system_failures_are_one_line(monkeypatch, official_checkpoint, tmp_path, capsys):
    path, _ = official_checkpoint
    (tmp_path / 'a_file').write_text('')
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path / 'a_file')]) == 2
    assert 'a_file is a file, not a folder' in _one_error_line(capsys)
    (tmp_path / NAME).write_text('')
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path), '--overwrite']) == 2
    assert f'{NAME} exists and is not a folder' in _one_error_line(capsys)
    (tmp_path / NAME).unlink()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(export, 'save_for_hf', full_disk)
        assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 2
    assert 'cannot write' in (err := _one_error_line(capsys)) and 'No space left on device' in err

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))
    with monkeypatch.context() as m:
        m.setattr(export.tempfile, 'mkdtemp', read_only)
        assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 2
    assert 'cannot write' in (err := _one_error_line(capsys)) and 'Read-only file system' in err
    assert _entries(tmp_path) == ['a_file']

    def rename_fails(self, target):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    with monkeypatch.context() as m:  # the last step, moving into place: an exact account
        m.setattr(export.Path, 'rename', rename_fails)
        assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 2
    assert f'written: none; not written: {tmp_path / NAME}' in _one_error_line(capsys)
    assert _entries(tmp_path) == ['a_file']


def _dead_pid():
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_stale_work_folders_of_dead_runs_are_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f'.{NAME}.tmp-{dead}-x1'
    (stale / 'sub').mkdir(parents=True)
    live = tmp_path / f'.{NAME}.tmp-{os.getpid()}-x2'
    live.mkdir()
    backup = tmp_path / f'.other.in1k.old-{dead}-x3'  # died between the two renames of a replacement
    (backup / 'folder').mkdir(parents=True)
    log = []
    (tmp_path / '.hidden').mkdir()
    export.remove_stale_work_folders(tmp_path, log.append)
    assert not stale.exists() and live.exists() and (tmp_path / '.hidden').exists()
    assert (tmp_path / 'other.in1k').is_dir() and not backup.exists()  # the published folder is back
    assert len(log) == 2


def test_sigterm_removes_the_temporary_folder(official_checkpoint, tmp_path):
    path, _ = official_checkpoint
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, '-m', 'timm_epsanet.hub_upload', f'epsanet50_small={path}',
                             '--out', str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(out.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        temp = list(out.iterdir())
        assert len(temp) == 1 and temp[0].name.startswith(f'.{NAME}.tmp-{proc.pid}-')
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not any(out.iterdir())


class FakeApi:
    """huggingface_hub.HfApi for push: records calls and what each upload holds."""
    calls = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(('create_repo', repo_id, kw))
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def create_branch(self, repo_id, **kw):
        FakeApi.calls.append(('create_branch', repo_id, kw))

    def file_exists(self, repo_id, filename, **kw):
        FakeApi.calls.append(('file_exists', repo_id, kw))
        return False

    def upload_folder(self, **kw):
        files = {p.name: p.read_bytes() for p in Path(kw['folder_path']).iterdir()}
        FakeApi.calls.append(('upload_folder', kw['repo_id'], dict(kw, files=files)))
        if kw['repo_id'].startswith('fail/'):
            raise ConnectionError('network down')
        return 'commit-url'


def test_push_uploads_the_validated_folder_in_one_commit(monkeypatch, official_checkpoint, tmp_path, capsys):
    import huggingface_hub
    path, _ = official_checkpoint
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    monkeypatch.setattr(timm.models._hub, 'HfApi', FakeApi)
    FakeApi.calls = []
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path), '--org', 'me', '--push', '--private',
                 '--revision', 'v1']) == 0
    names = [c[0] for c in FakeApi.calls]
    assert names[-1] == 'upload_folder' and names.count('upload_folder') == 1 and 'create_branch' in names
    upload = FakeApi.calls[-1][2]
    assert upload['repo_id'] == f'me/{NAME}' and upload['revision'] == 'v1' and upload['create_pr'] is False
    # exactly the bytes that were validated: same files, same contents
    assert upload['files'] == {p.name: p.read_bytes() for p in (tmp_path / NAME).iterdir()}
    FakeApi.calls = []
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path), '--overwrite', '--org', 'fail',
                 '--push']) == 2
    err = _one_error_line(capsys)
    assert f'pushing fail/{NAME} failed (ConnectionError: network down); pushed: none' in err
