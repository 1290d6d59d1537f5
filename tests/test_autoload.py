"""After `pip install`, `import timm` alone sees the EPSANet models; interpreter start stays untouched."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = '''
import sys
early = sorted(m for m in ("torch", "timm", "timm_epsanet") if m in sys.modules)
import timm
registered = timm.list_models("epsanet*")
model = timm.create_model("epsanet50_small") if registered else None
import timm_epsanet
print(early, sorted(registered), model is not None, timm_epsanet.__file__, sep="\\n")
'''


def _run(code, cwd, env_extra=None, flags=()):
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_EPSANET_AUTOLOAD'}
    env.update(env_extra or {})
    out = subprocess.run(
        [sys.executable, *flags, '-c', code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_import_timm_alone_registers(tmp_path):
    early, registered, created, _ = _run(CHECK, tmp_path)
    assert early == '[]', 'torch/timm/timm_epsanet must not be imported at interpreter start'
    assert registered == str(['epsanet101_large', 'epsanet101_small', 'epsanet50_large', 'epsanet50_small'])
    assert created == 'True'


@pytest.mark.parametrize('value', ['0', 'false'])
def test_opt_out_env_var(tmp_path, value):
    early, registered, created, _ = _run(CHECK, tmp_path, {'TIMM_EPSANET_AUTOLOAD': value})
    assert early == '[]' and registered == '[]' and created == 'False'
    # the explicit import still registers
    code = 'import timm, timm_epsanet; print(len(timm.list_models("epsanet*")))'
    assert _run(code, tmp_path, {'TIMM_EPSANET_AUTOLOAD': value}) == ['4']


def test_this_environment_is_an_editable_install():
    """The README installs with `pip install -e`; the hook must work from there (test above)."""
    from importlib.metadata import distribution
    direct_url = distribution('timm-epsanet').read_text('direct_url.json') or ''
    assert '"editable": true' in direct_url
    import timm_epsanet
    assert Path(timm_epsanet.__file__).resolve().parent == REPO / 'timm_epsanet'


def test_wheel_install_registers(tmp_path):
    """A normal (non-editable) install from the wheel carries the hook in site-packages."""
    subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path / 'dist'),
         str(REPO)], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / 'dist').glob('timm_epsanet-*.whl')
    target = tmp_path / 'site'
    subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)],
        check=True, capture_output=True, timeout=300)
    assert (target / 'timm_epsanet_autoload.pth').is_file()
    # -S: skip this environment's .pth files (the editable hook); keep its packages (torch, timm)
    # reachable as plain paths, and let `site` process only the wheel's target directory.
    paths = [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]
    code = f'import sys, site; sys.path.extend({paths!r}); site.addsitedir({str(target)!r})\n' + CHECK
    early, registered, created, location = _run(code, tmp_path, flags=('-S',))
    assert early == '[]' and created == 'True' and len(eval(registered)) == 4
    assert Path(location).is_relative_to(target)
