"""pretrained=True end to end: a real huggingface_hub client against a local Hub serving hub_upload output.

Every failure of a download is bounded in time and retries, names the repo and file, and says
what to do; a file that does not match the Hub's sha256 never stays in the cache.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch

import timm_epsanet  # noqa: F401
from tests.fake_hub import FakeHub
from timm_epsanet._download import HEAD_TRIES
from timm_epsanet.convert import CheckpointError
from timm_epsanet.hub_upload.export import export_folder

ORG = 'testorg'
REPO = f'{ORG}/epsanet50_small.in1k'
DEADLINE = 4  # s, TIMM_EPSANET_DOWNLOAD_TIMEOUT of the fault cases
SLACK = 6  # s allowed on top for the HEAD requests, reading and building the model on a busy machine

# Runs several create_model calls in one interpreter (each case: model name, kwargs, environment).
CLIENT = '''
import json, os, sys, time, torch, timm
x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
for case in json.loads(sys.argv[1]):
    os.environ.update(case.get("env", {}))
    start = time.monotonic()
    try:
        model = timm.create_model(case["name"], pretrained=True, **case.get("kwargs", {})).eval()
        with torch.no_grad():
            out = {"logits": model(x)[0, :5].tolist(), "hub_id": model.pretrained_cfg.get("hf_hub_id")}
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)}
    out["seconds"] = time.monotonic() - start
    print(json.dumps(out), flush=True)
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


def client(cases, hub_url, hf_home, offline=False, env=None):
    """Results of `cases` (dicts: name, kwargs, env) run in a fresh interpreter, in order."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'TIMM_EPSANET_'))}
    full_env.update(HF_ENDPOINT=hub_url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET='1', TIMM_EPSANET_HUB_ORG=ORG,
                    HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_ETAG_TIMEOUT='1', HF_HUB_DOWNLOAD_TIMEOUT='1',
                    **(env or {}))
    if offline:
        full_env['HF_HUB_OFFLINE'] = '1'
    out = subprocess.run([sys.executable, '-c', CLIENT, json.dumps(cases)], env=full_env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
    assert len(results) == len(cases), out.stdout + out.stderr
    return results


def test_download_cache_and_offline(published, tmp_path):
    folder, expected = published
    hf_home = tmp_path / 'hf'
    with FakeHub({REPO: folder}) as hub:
        # 1. plain pretrained=True: the default repo (organisation overridden) is downloaded;
        # 2. asked again, from the cache; hf-hub: names resolve the same repo
        first, again = client([{'name': 'epsanet50_small'}, {'name': f'hf-hub:{REPO}'}], hub.url, hf_home)
    for result in (first, again):
        torch.testing.assert_close(torch.tensor(result['logits']), expected)
    assert first['hub_id'] == REPO and hub.downloads.count('model.safetensors') == 1
    # 3. offline with a warm cache: no server at all
    offline, = client([{'name': 'epsanet50_small'}], 'http://127.0.0.1:9', hf_home, offline=True)
    torch.testing.assert_close(torch.tensor(offline['logits']), expected)


def test_offline_cold_cache_says_what_to_do(tmp_path):
    result, = client([{'name': 'epsanet50_small'}], 'http://127.0.0.1:9', tmp_path / 'hf', offline=True)
    assert result['error'] == 'DownloadError'
    assert 'not in the local Hugging Face cache and HF_HUB_OFFLINE is set' in result['message']
    assert REPO in result['message'] and 'Run once with network access' in result['message']


def _weights_with(folder, tmp_path, name, edit):
    """A copy of the published repo folder whose weights are edited by `edit(state_dict)`."""
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    state_dict = safetensors.torch.load_file(copy / 'model.safetensors')
    edit(state_dict)
    safetensors.torch.save_file(state_dict, copy / 'model.safetensors')
    return copy


def _set(key, value):
    def edit(state_dict):
        state_dict[key][0] = value
    return edit


@pytest.fixture(scope='module')
def faults(published, tmp_path_factory):
    """One client run through every kind of failing Hub; returns {case: (result, hub, cache dir)}."""
    folder, _ = published
    tmp = tmp_path_factory.mktemp('faults')
    nan = _weights_with(folder, tmp, 'nan', _set('layer2.0.conv1.weight', float('nan')))
    altered = _weights_with(folder, tmp, 'altered', _set('fc.bias', 1.0))
    bin_only = tmp / 'bin_only'
    shutil.copytree(folder, bin_only)
    torch.save(safetensors.torch.load_file(folder / 'model.safetensors'), bin_only / 'pytorch_model.bin')
    (bin_only / 'model.safetensors').unlink()
    repos = {f'{ORG}/{name}': folder for name in ('error', 'hang-head', 'hang-get', 'stall', 'cut', 'altered')}
    repos.update({f'{ORG}/nan': nan, f'{ORG}/bin-only': bin_only})
    fault_of = {f'{ORG}/{name}': name.replace('-', '_') for name in (
        'error', 'hang-head', 'hang-get', 'stall', 'cut', 'altered')}
    substitutes = {f'{ORG}/altered': (altered / 'model.safetensors').read_bytes()}
    names = ('error', 'hang-head', 'hang-get', 'stall', 'cut', 'altered', 'nan', 'bin-only', 'hf-hub hang-head')
    cases = []
    for name in names:
        repo = f'{ORG}/{name.split()[-1]}'
        case = {'name': f'hf-hub:{repo}'} if name.startswith('hf-hub') else {
            'name': 'epsanet50_small', 'kwargs': {'pretrained_cfg_overlay': {'hf_hub_id': repo}}}
        case.setdefault('kwargs', {})['cache_dir'] = str(tmp / 'cache' / name.replace(' ', '_'))
        case['env'] = {'TIMM_EPSANET_DOWNLOAD_TIMEOUT': str(30 if name == 'cut' else DEADLINE)}
        cases.append(case)
    with FakeHub(repos, faults=fault_of, substitutes=substitutes) as hub:
        results = client(cases, hub.url, tmp / 'hf')
    return {name: (result, hub, tmp / 'cache' / name.replace(' ', '_')) for name, result in zip(names, results)}


def _failed(faults, name, error='DownloadError'):
    result, hub, cache = faults[name]
    assert result.get('error') == error, result
    assert f'{ORG}/{name.split()[-1]}' in result['message']
    return result['message'], result['seconds'], hub, cache


def test_server_error_names_the_file_wanted(faults):
    message, seconds, hub, _ = _failed(faults, 'error')
    assert 'model.safetensors' in message and 'pytorch_model.bin' not in message
    assert 'HTTP 500' in message and 'try again later' in message
    assert hub.count('HEAD', f'{ORG}/error') == HEAD_TRIES and hub.count('GET', f'{ORG}/error') == 0


@pytest.mark.parametrize('name', ['hang-head', 'hf-hub hang-head'])
def test_hub_that_never_answers(faults, name):
    message, seconds, hub, _ = _failed(faults, name)
    assert 'could not reach the Hub' in message and 'HF_HUB_ETAG_TIMEOUT' in message and 'hf download' in message
    assert 'model.safetensors' in message and seconds < HEAD_TRIES * 1 + SLACK
    weight_heads = [r for r in hub.requests if r[0] == 'HEAD' and r[1] == f'{ORG}/hang-head' and r[2] != 'config.json']
    assert len(weight_heads) == 2 * HEAD_TRIES  # both cases together: no retries beyond HEAD_TRIES each


@pytest.mark.parametrize('name', ['hang-get', 'stall'])
def test_download_has_a_deadline(faults, name):
    message, seconds, _, _ = _failed(faults, name)
    assert f'did not finish within {DEADLINE} s' in message and 'TIMM_EPSANET_DOWNLOAD_TIMEOUT' in message
    assert 'model.safetensors' in message and 'hf download' in message
    assert DEADLINE <= seconds < DEADLINE + SLACK


def test_download_cut_every_time_gives_up(faults):
    message, seconds, hub, _ = _failed(faults, 'cut')
    assert 'kept breaking off the transfer' in message and 'TIMM_EPSANET_DOWNLOAD_TIMEOUT' in message and 'model.safetensors' in message
    assert seconds < 30 and hub.count('GET', f'{ORG}/cut') <= 6


def test_altered_download_is_refused_and_removed_from_the_cache(faults):
    message, _, _, cache = _failed(faults, 'altered')
    assert 'does not match the Hub\'s sha256' in message and 'removed from the cache' in message
    assert 'model.safetensors' in message
    assert not [p for p in cache.rglob('*') if p.is_file() and p.stat().st_size > 1_000_000]


def test_non_finite_weights_on_the_hub_are_refused(faults):
    message, _, _, _ = _failed(faults, 'nan', error='CheckpointError')
    assert 'model.safetensors of testorg/nan' in message and 'layer2.0.conv1.weight' in message
    assert 'NaN or Inf' in message


def test_pickle_only_repo_loads(faults, published):
    result, hub, _ = faults['bin-only']
    torch.testing.assert_close(torch.tensor(result['logits']), published[1])
    assert ('GET', f'{ORG}/bin-only', 'pytorch_model.bin') in hub.requests


def test_local_dir_with_non_finite_weights(published, tmp_path):
    nan = _weights_with(published[0], tmp_path, 'nan', _set('bn1.running_var', float('inf')))
    with pytest.raises(CheckpointError, match=r'bn1\.running_var') as info:
        timm.create_model(f'local-dir:{nan}', pretrained=True)
    assert str(nan) in str(info.value)


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
