"""Registers EPSANet with timm the moment timm is imported, without importing anything early.

`timm_epsanet_autoload.pth` (installed next to this file in site-packages) calls `install()` at
interpreter start. That only appends a finder to `sys.meta_path`: no torch, no timm, no
timm_epsanet is imported until the program itself imports timm. Then the finder lets timm load
as usual and imports `timm_epsanet` right after, so `timm.create_model("epsanet50_small")`,
train.py and any other timm script see the models.

Opt out with the environment variable TIMM_EPSANET_AUTOLOAD=0 (`import timm_epsanet` then
registers explicitly).
"""
import os
import sys
import warnings

ENV_VAR = 'TIMM_EPSANET_AUTOLOAD'


def enabled() -> bool:
    return os.environ.get(ENV_VAR, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def _register_after(loader) -> None:
    exec_module = loader.exec_module

    def exec_module_then_register(module):
        exec_module(module)
        try:
            import timm_epsanet  # noqa: F401  (registers the models)
        except Exception as e:  # never break `import timm` itself
            warnings.warn(
                f'timm_epsanet could not register its models with timm ({e!r}); '
                f'set {ENV_VAR}=0 to stop trying', stacklevel=2)

    loader.exec_module = exec_module_then_register


class _TimmImportHook:
    """One-shot meta path finder: wraps the loader of the top-level `timm` package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, 'exec_module'):
            _register_after(spec.loader)
        return spec


def install() -> None:
    if not enabled() or any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        return
    if 'timm' in sys.modules:  # imported before site ran us: register now
        import timm_epsanet  # noqa: F401
        return
    sys.meta_path.insert(0, _TimmImportHook())  # ahead of PathFinder, which would find timm first
