"""Checkpoint -> validated, Hub-ready folder; publishing through timm's `push_to_hf_hub`.

A folder is written to a temporary folder next to its target (`.<name>.tmp-<pid>-<random>`),
validated by reloading it through timm's `local-dir:` loader, and only then moved into place; an
existing folder is replaced by two renames, so a failure leaves either the old or the new folder.
Temporary folders of runs that were killed are removed by the next run.
"""
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from safetensors import SafetensorError
from torch import nn

import timm_epsanet  # noqa: F401  (registers the models)
from timm.models import push_to_hf_hub, save_for_hf
from timm.models._hub import generate_readme
from timm_epsanet.convert import check_compatible, convert_official, is_official, load_weights
from timm_epsanet.hub import hub_id

from .card import model_card

VALIDATION_SEED = 0
TOLERANCE = 1e-5  # largest absolute logit difference accepted after the reload
_WORK_FOLDER = re.compile(r'^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]+$')


class ExportError(RuntimeError):
    """A folder that could not be written or did not validate; the message is one line."""


@dataclass
class Export:
    """A validated folder waiting in its temporary place, and what pushing it needs."""
    variant: str
    repo_id: str
    target: Path
    folder: Path
    model: nn.Module
    label_config: dict
    card: dict


def _fixed_input(model) -> torch.Tensor:
    """Small images reach every weight (global pooling), at a fraction of the cost of 224 x 224."""
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    return torch.randn(2, model.pretrained_cfg['input_size'][0], 64, 64, generator=gen)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_work_folders(out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Remove the temporary folders of runs that died (SIGKILL, power loss); put back a folder
    whose replacement was cut between its two renames."""
    if not out_dir.is_dir():
        return
    for path in sorted(out_dir.iterdir()):
        m = _WORK_FOLDER.match(path.name)
        if not m or not path.is_dir() or _alive(int(m.group('pid'))):
            continue
        target = out_dir / m.group('name')
        if m.group('kind') == 'old' and not target.exists() and (path / 'folder').is_dir():
            (path / 'folder').rename(target)
            shutil.rmtree(path, ignore_errors=True)
            log(f'restored {target} (a run with pid {m.group("pid")} died while replacing it)')
        else:
            shutil.rmtree(path, ignore_errors=True)
            log(f'removed {path} (left by a run with pid {m.group("pid")} that died)')


def _os_error(what: str, e: Exception) -> ExportError:
    reason = getattr(e, 'strerror', None) or str(e).strip().splitlines()[0]
    return ExportError(f'cannot write {what}: {reason}')


def target_folder(out_dir: Path, repo_id: str, overwrite: bool) -> Path:
    """Where the folder of `repo_id` goes; ExportError if it cannot go there."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f'{out_dir} is a file, not a folder: choose another --out')
    target = out_dir / repo_id.split('/')[-1]
    if target.exists() and not target.is_dir():
        raise ExportError(f'{target} exists and is not a folder: remove it or choose another --out')
    if target.exists() and not overwrite:
        raise ExportError(f'{target} exists; pass --overwrite to replace it')
    return target


def prepare_folder(
        variant: str,
        checkpoint: Path,
        out_dir: Path,
        use_ema: bool = False,
        repo_id: Optional[str] = None,
        overwrite: bool = False,
        top1: Optional[float] = None,
        top5: Optional[float] = None,
        log: Callable[[str], None] = print,
) -> Export:
    """Write and validate the folder of one variant in its temporary place (see `install_folder`)."""
    repo_id = repo_id or hub_id(variant)
    target = target_folder(out_dir, repo_id, overwrite)
    log(f'[{variant}] 1/4 loading {checkpoint}')
    model = timm.create_model(variant).eval()
    raw = load_weights(checkpoint, use_ema=use_ema)
    official = is_official(raw)
    state_dict = convert_official(raw) if official else raw
    check_compatible(state_dict, model, str(checkpoint))
    model.load_state_dict(state_dict)
    del raw, state_dict

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-{os.getpid()}-', dir=target.parent))
    except OSError as e:
        raise _os_error(str(target.parent), e) from None
    try:
        log(f'[{variant}] 2/4 writing model.safetensors and config.json')
        label_config = {}
        if model.num_classes == 1000:
            info = timm.data.ImageNetInfo()
            label_config = dict(label_names=info.label_names(), label_descriptions=info.label_descriptions(as_dict=True))
        save_for_hf(model, folder, model_config=label_config, safe_serialization=True)

        log(f'[{variant}] 3/4 validating: reload with timm "local-dir:" and compare logits')
        reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        x = _fixed_input(model)
        with torch.no_grad():
            expected, got = model(x), reloaded(x)
        diff = (got - expected).abs().max().item()
        if not bool(torch.isfinite(expected).all()):
            raise ExportError(f'{checkpoint}: the model gives NaN or Inf logits on a random input; not exported')
        if not diff <= TOLERANCE:  # also refuses NaN
            raise ExportError(f'{checkpoint}: validation failed: reloaded logits differ by {diff:.3g}')

        log(f'[{variant}] 4/4 writing README.md (model card)')
        card = model_card(variant, repo_id, model, Path(checkpoint).name,
                          'official training script checkpoint' if official else 'timm checkpoint',
                          use_ema, diff, top1, top5)
        (folder / 'README.md').write_text(generate_readme(card, repo_id.split('/')[-1]), encoding='utf-8')
        folder.chmod(0o755)  # mkdtemp makes it private
        for f in folder.iterdir():
            f.chmod(0o644)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise _os_error(str(target), e) from None
    except BaseException:  # also SystemExit from SIGTERM (see __main__) and KeyboardInterrupt
        shutil.rmtree(folder, ignore_errors=True)
        raise
    log(f'[{variant}] validated (max |logit diff| after reload {diff:.1e})')
    return Export(variant, repo_id, target, folder, model, label_config, card)


def install_folder(export: Export) -> Path:
    """Move a validated folder into place; an existing one is replaced by two renames."""
    old = None
    try:
        if export.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{export.target.name}.old-{os.getpid()}-', dir=export.target.parent))
            export.target.rename(old / 'folder')
        export.folder.rename(export.target)
    except OSError as e:
        if old is not None and (old / 'folder').exists() and not export.target.exists():
            (old / 'folder').rename(export.target)  # put the published folder back
        discard_folder(export)
        raise _os_error(str(export.target), e) from None
    finally:
        if old is not None and export.target.exists():  # else the next run puts it back
            shutil.rmtree(old, ignore_errors=True)
    return export.target


def discard_folder(export: Export) -> None:
    shutil.rmtree(export.folder, ignore_errors=True)


def export_folder(variant: str, checkpoint: Path, out_dir: Path, log: Callable[[str], None] = print, **kwargs) -> Path:
    """`prepare_folder` then `install_folder`: one variant's folder, validated, in place."""
    target = install_folder(prepare_folder(variant, checkpoint, out_dir, log=log, **kwargs))
    log(f'wrote {target}')
    return target


def push(export: Export, private: bool = False, revision: Optional[str] = None, create_pr: bool = False,
         log: Callable[[str], None] = print):
    """Upload with timm's `push_to_hf_hub`, in one commit. It writes the files as the validated folder
    holds them (same `save_for_hf`, same `generate_readme` of the same card), and keeps a README.md
    the repo already has."""
    from huggingface_hub import HfApi
    api = HfApi()  # token from HF_TOKEN or `hf auth login`
    if revision and not create_pr:  # push_to_hf_hub commits to a branch that exists
        api.create_repo(export.repo_id, private=private, exist_ok=True)
        api.create_branch(export.repo_id, branch=revision, exist_ok=True)
    if api.file_exists(export.repo_id, 'README.md', revision=revision):
        log(f'note: {export.repo_id} already has a README.md, which push_to_hf_hub keeps; '
            f'compare it with {export.target / "README.md"}')
    log(f'uploading {export.target} to {export.repo_id} ({"pull request" if create_pr else revision or "main"})')
    return push_to_hf_hub(
        export.model, export.repo_id, private=private, revision=revision, create_pr=create_pr,
        commit_message=f'Add {export.target.name} weights (model.safetensors, config.json, model card)',
        model_config=export.label_config, model_card=export.card, safe_serialization=True)
