"""timm's own model tests (tests/test_models.py of the installed timm's sdist) on the EPSANet
variants: forward, backward, default cfgs, TorchScript, features, FX. They define what a timm
model is, and need no network once the sdist is cached.

The sdist is fetched with pip into pytest's cache (`.pytest_cache/d/timm-sdist-<version>`); only its
tests and pytest config are unpacked, so that its `timm/` sources never shadow the installed timm.
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

SELECTION = 'epsanet'  # pytest -k: every test timm parametrizes with one of our variants


@pytest.fixture(scope='session')
def timm_tests(request, tmp_path_factory) -> Path:
    """The unpacked tests of the installed timm's sdist: <dir>/tests/test_models.py (in pytest's
    cache, or a temporary folder when the cache is off)."""
    name = f'timm-sdist-{timm.__version__}'
    cache = getattr(request.config, 'cache', None)
    root = Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)
    if not (root / 'tests' / 'test_models.py').exists():
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-binary', ':all:', '--no-deps',
             f'timm=={timm.__version__}', '--dest', str(root)],
            check=True)
        sdist, = root.glob('timm-*.tar.gz')
        prefix = f'timm-{timm.__version__}/'
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name == prefix + 'pyproject.toml' or m.name.startswith(prefix + 'tests/')]
            for m in members:
                m.name = m.name[len(prefix):]
            safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
            tar.extractall(root, members=members, **safe)
    return root


def test_timm_model_tests_pass(timm_tests):
    """In two processes at once, the Small and the Large variants (one per core of a 2-core machine)."""
    # -p timm_epsanet registers the variants before timm's module lists the models to test
    runs = {size: subprocess.Popen(
        [sys.executable, '-m', 'pytest', 'tests/test_models.py', '-k', f'{SELECTION} and {size}', '-p', 'timm_epsanet',
         '-p', 'no:cacheprovider', '-q', '-rfE', '-W', 'ignore::pytest.PytestUnknownMarkWarning'],
        cwd=timm_tests, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS='1')) for size in ('small', 'large')}
    try:
        for size, run in runs.items():
            stdout, stderr = run.communicate()
            summary = stdout.strip().splitlines()[-1] if stdout.strip() else ''
            assert run.returncode == 0, f'timm tests of the {size} variants failed: {summary}\n{stdout[-6000:]}\n{stderr[-2000:]}'
            assert ' passed' in summary and 'deselected' in summary, summary
    finally:
        for run in runs.values():
            run.kill()
