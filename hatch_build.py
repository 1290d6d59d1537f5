"""Build hook: an editable install gets the autoload hook only.

The wheel's force-include also copies recipes/ into timm_epsanet/recipes; in an editable install
that copy would be a `timm_epsanet` folder in site-packages, found as a namespace package before
the editable finder maps the real one. The editable install reads recipes/ from the repository.
"""
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

AUTOLOAD = {
    'autoload/_timm_epsanet_autoload.py': '_timm_epsanet_autoload.py',
    'autoload/timm_epsanet_autoload.pth': 'timm_epsanet_autoload.pth',
}


class EditableHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == 'editable':
            build_data['force_include_editable'] = dict(AUTOLOAD)
