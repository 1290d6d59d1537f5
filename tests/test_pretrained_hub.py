"""pretrained=True end to end: a real huggingface_hub client against a local Hub serving hub_upload output."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import timm_epsanet  # noqa: F401
from hub_upload.export import export_folder
from tests.fake_hub import FakeHub

ORG = 'testorg'
REPO = f'{ORG}/epsanet50_small.in1k'

CLIENT = '''
import json, sys, torch, timm
x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
try:
    model = timm.create_model(sys.argv[1], pretrained=True).eval()
    with torch.no_grad():
        print(json.dumps({"logits": model(x)[0, :5].tolist(), "hub_id": model.pretrained_cfg.get("hf_hub_id")}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
'''


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """A hub_upload folder of random epsanet50_small weights, and the logits it must give."""
    root = tmp_path_factory.mktemp('hub')
    torch.manual_seed(0)
    model = timm.create_model('epsanet50_small').eval()
    torch.save({'state_dict': model.state_dict()}, root / 'last.pth.tar')
    folder = export_folder('epsanet50_small', root / 'last.pth.tar', root / 'out', repo_id=REPO, log=lambda _: None)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)[0, :5]
    return folder, expected


def client(name, hub_url, hf_home, offline=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET='1', TIMM_EPSANET_HUB_ORG=ORG,
               HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_ETAG_TIMEOUT='5', HF_HUB_DOWNLOAD_TIMEOUT='10')
    if offline:
        env['HF_HUB_OFFLINE'] = '1'
    out = subprocess.run([sys.executable, '-c', CLIENT, name], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_download_cache_and_offline(published, tmp_path):
    folder, expected = published
    hf_home = tmp_path / 'hf'
    with FakeHub({REPO: folder}) as hub:
        # 1. plain pretrained=True: the default repo (organisation overridden) is downloaded
        first = client('epsanet50_small', hub.url, hf_home)
        torch.testing.assert_close(torch.tensor(first['logits']), expected)
        assert first['hub_id'] == REPO and hub.downloads.count('model.safetensors') == 1
        # 2. cached: asked again, nothing is downloaded again; hf-hub: names resolve the same repo
        again = client(f'hf-hub:{REPO}', hub.url, hf_home)
        torch.testing.assert_close(torch.tensor(again['logits']), expected)
        assert hub.downloads.count('model.safetensors') == 1
    # 3. offline with a warm cache: no server at all
    offline = client('epsanet50_small', hub.url, hf_home, offline=True)
    torch.testing.assert_close(torch.tensor(offline['logits']), expected)


def test_offline_cold_cache_says_what_to_do(tmp_path):
    result = client('epsanet50_small', 'http://127.0.0.1:9', tmp_path / 'hf', offline=True)
    assert result['error'] == 'RuntimeError'
    assert 'not in the local Hugging Face cache and HF_HUB_OFFLINE is set' in result['message']
    assert 'Run once with network access' in result['message']


def test_server_error_and_corrupt_download(published, tmp_path):
    folder, _ = published
    with FakeHub({REPO: folder}) as hub:
        hub.mode = 'error'
        failed = client('epsanet50_small', hub.url, tmp_path / 'hf1')
        assert failed['error'] == 'RuntimeError' and 'Could not download the weights of epsanet50_small' in failed['message']
        assert hub.url in failed['message']
        hub.mode = 'corrupt'
        corrupt = client('epsanet50_small', hub.url, tmp_path / 'hf2')
        assert corrupt['error'] == 'RuntimeError' and 'probably corrupted' in corrupt['message']


def test_model_card_loads_from_the_hub(published, tmp_path):
    folder, _ = published
    code = f'''
from huggingface_hub import ModelCard
card = ModelCard.load({REPO!r})
print(card.data.library_name, card.data.pipeline_tag, card.data.license, ",".join(card.data.datasets), ",".join(card.data.tags))
'''
    with FakeHub({REPO: folder}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / 'hf'), HF_HUB_DISABLE_XET='1')
        out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['timm', 'image-classification', 'apache-2.0', 'imagenet-1k',
                                  'image-classification,timm,epsanet,pyramid-squeeze-attention']
