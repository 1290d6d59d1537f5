"""What `pip install` gives a user: a wheel and sdist that pass `twine check`, with the package and
its recipes, and nothing else at the top level of site-packages (no `tests`, no `hub_upload`)."""
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def test_wheel_and_sdist_can_be_published(tmp_path):
    subprocess.run([sys.executable, '-m', 'build', '--no-isolation', '-o', str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    wheel, = tmp_path.glob('timm_epsanet-*.whl')
    sdist, = tmp_path.glob('timm_epsanet-*.tar.gz')
    check = subprocess.run([sys.executable, '-m', 'twine', 'check', '--strict', str(wheel), str(sdist)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split('/')[0] for n in names if not n.startswith('timm_epsanet-')}
    assert top == {'timm_epsanet', '_timm_epsanet_autoload.py', 'timm_epsanet_autoload.pth'}
    assert 'timm_epsanet/hub_upload/__main__.py' in names and 'timm_epsanet/recipes/imagenet_paper.yaml' in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith('METADATA'))).decode()
    for dependency in ('huggingface_hub', 'safetensors', 'timm', 'torch'):  # imported directly, so declared
        assert f'Requires-Dist: {dependency}'.replace('_', '-') in metadata.replace('_', '-')


def test_install_exposes_only_the_package(tmp_path):
    """The editable install maps timm_epsanet alone, not the repository root: `import tests` in the
    environment must not find this project's tests."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    code = ('import importlib.util as u; '
            'print(*(u.find_spec(m) is not None for m in ("tests", "benchmarks", "hub_upload", "timm_epsanet")))')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == ['False', 'False', 'False', 'True']


def test_the_python_floor_is_at_least_timms():
    """pip on a Python timm does not support refuses this package by name, rather than failing to
    find a timm for it."""
    ours = re.search(r'^requires-python = ">=([\d.]+)"', (REPO / 'pyproject.toml').read_text(), re.M).group(1)
    timm_needs = re.fullmatch(r'>=([\d.]+)', importlib.metadata.metadata('timm')['Requires-Python']).group(1)
    assert Version(ours) >= Version(timm_needs)
