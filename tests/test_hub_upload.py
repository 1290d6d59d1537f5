"""hub_upload: checkpoints -> validated Hub folders (safetensors, timm config, model card), push in one commit."""
import json
import struct

import markdown
import pytest
import timm
import torch
from huggingface_hub import ModelCard

import timm_epsanet  # noqa: F401
from hub_upload.__main__ import main
from hub_upload.export import push_folder
from tests.test_convert import OfficialEPSANet, save_official


@pytest.fixture(scope='module')
def official_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = OfficialEPSANet().eval()
    return save_official(model, tmp_path_factory.mktemp('ckpt') / 'model_best.pth.tar'), model


def test_dry_run_writes_a_valid_hub_folder(official_checkpoint, tmp_path, capsys):
    path, official = official_checkpoint
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '3/4 validating' in out and 'dry run' in out
    folder = tmp_path / 'epsanet50_small.in1k'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epsanet50_small.in1k']  # no temp folder left
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']

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


def test_model_card(official_checkpoint, tmp_path):
    path, _ = official_checkpoint
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path), '--top1', '77.1', '--top5', '93.4']) == 0
    text = (tmp_path / 'epsanet50_small.in1k' / 'README.md').read_text()
    card = ModelCard(text)
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert card.data.license == 'apache-2.0' and card.data.datasets == ['imagenet-1k']
    for needle in ('| Params (M) | 22.56 |', '| GMACs | 3.60 |', 'Activations (M)', '224 x 224',
                   'Reported by the paper (Table 2), not measured on these weights', 'top-1 77.49%',
                   '| ImageNet-1k val top-1 / top-5 (measured on these weights) | 77.10 / 93.40 |',
                   'official training script checkpoint', 'reverse order', 'features_only=True',
                   'num_classes=0', '@inproceedings{zhang2022epsanet'):
        assert needle in text, needle
    html = markdown.markdown(card.text, extensions=['tables', 'fenced_code'])
    assert html.count('<table>') == 1 and '<td>Params (M)</td>' in html
    assert html.count('<pre><code class="language-python">') == 3 and '<code class="language-bibtex">' in html
    assert '<h2>Usage</h2>' in html and '<h2>Citation</h2>' in html


def test_no_measured_accuracy_unless_given(official_checkpoint, tmp_path):
    path, _ = official_checkpoint
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 0
    assert 'measured on these weights) |' not in (tmp_path / 'epsanet50_small.in1k' / 'README.md').read_text()


def test_failures_leave_nothing(official_checkpoint, tmp_path, capsys):
    path, _ = official_checkpoint
    assert main([f'epsanet50_large={path}', '--out', str(tmp_path)]) == 2  # a Small checkpoint
    err = capsys.readouterr().err
    assert str(path) in err and 'looks like epsanet50_small' in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 0
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path)]) == 2
    assert 'pass --overwrite' in capsys.readouterr().err
    assert main([f'epsanet50_small={path}', '--out', str(tmp_path), '--overwrite']) == 0
    with pytest.raises(SystemExit):
        main(['resnet50=x.pth'])


class FakeApi:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(('create_repo', repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(('create_branch', repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(('upload_folder', kw['repo_id'], kw))
        if self.fail:
            raise ConnectionError('network down')
        return 'commit-url'


def test_push_is_one_commit(tmp_path):
    folder = tmp_path / 'epsanet50_small.in1k'
    folder.mkdir()
    api = FakeApi()
    push_folder(folder, 'me/epsanet50_small.in1k', private=True, revision='v1', api=api, log=lambda _: None)
    assert [c[0] for c in api.calls] == ['create_repo', 'create_branch', 'upload_folder']
    assert api.calls[0][2]['private'] is True and api.calls[0][2]['exist_ok'] is True
    upload = api.calls[2][2]
    assert upload['folder_path'] == str(folder) and upload['revision'] == 'v1' and upload['create_pr'] is False
    pr = FakeApi()
    push_folder(folder, 'me/x', create_pr=True, api=pr, log=lambda _: None)
    assert [c[0] for c in pr.calls] == ['create_repo', 'upload_folder'] and pr.calls[1][2]['create_pr'] is True
    with pytest.raises(ConnectionError):
        push_folder(folder, 'me/x', api=FakeApi(fail=True), log=lambda _: None)
