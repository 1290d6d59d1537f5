"""Checkpoint -> validated, Hub-ready folder; optional push in one commit."""
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import timm
import torch

import timm_epsanet  # noqa: F401  (registers the models)
from timm_epsanet.convert import is_official, load_checkpoint
from timm_epsanet.hub import hub_id

from .card import model_card

VALIDATION_SEED = 0


def _fixed_input(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    return torch.randn(2, *model.pretrained_cfg['input_size'], generator=gen)


def export_folder(
        variant: str,
        checkpoint: Path,
        out_dir: Path,
        use_ema: bool = False,
        repo_id: Optional[str] = None,
        overwrite: bool = False,
        top1: Optional[float] = None,
        top5: Optional[float] = None,
        log: Callable[[str], None] = print,
) -> Path:
    """Write `out_dir/<repo name>/` with model.safetensors, config.json, README.md; return its path.

    Everything is written to a temporary folder next to the target, validated by reloading it
    through timm's `local-dir:` loader, and only then moved into place: a failure leaves nothing.
    """
    repo_id = repo_id or hub_id(variant)
    target = Path(out_dir) / repo_id.split('/')[-1]
    if target.exists() and not overwrite:
        raise FileExistsError(f'{target} exists; pass --overwrite to replace it')
    log(f'[{variant}] 1/4 loading {checkpoint}')
    model = timm.create_model(variant).eval()
    raw_is_official = _peek_official(checkpoint)
    model.load_state_dict(load_checkpoint(checkpoint, model, use_ema=use_ema))

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.', dir=target.parent))
    try:
        log(f'[{variant}] 2/4 writing model.safetensors and config.json')
        label_config = {}
        if model.num_classes == 1000:
            info = timm.data.ImageNetInfo()
            label_config = dict(label_names=info.label_names(), label_descriptions=info.label_descriptions(as_dict=True))
        timm.models.save_for_hf(model, tmp, model_config=label_config, safe_serialization=True)

        log(f'[{variant}] 3/4 validating: reload with timm "local-dir:" and compare logits')
        reloaded = timm.create_model(f'local-dir:{tmp}', pretrained=True).eval()
        x = _fixed_input(model)
        with torch.no_grad():
            diff = (reloaded(x) - model(x)).abs().max().item()
        if diff > 1e-5:
            raise RuntimeError(f'validation failed: reloaded logits differ by {diff:.3g}')

        log(f'[{variant}] 4/4 writing README.md (model card)')
        source_format = 'official training script checkpoint' if raw_is_official else 'timm checkpoint'
        card = model_card(variant, repo_id, model, Path(checkpoint).name, source_format, use_ema, diff, top1, top5)
        (tmp / 'README.md').write_text(card)
        tmp.chmod(0o755)  # mkdtemp makes it private
        for f in tmp.iterdir():
            f.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f'[{variant}] wrote {target} (max |logit diff| after reload {diff:.1e})')
    return target


def _peek_official(checkpoint: Path) -> bool:
    from timm.models import load_state_dict
    try:
        return is_official(load_state_dict(str(checkpoint), use_ema=False, weights_only=True))
    except Exception:
        return False  # load_checkpoint reports the problem


def push_folder(folder: Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                create_pr: bool = False, api=None, log: Callable[[str], None] = print):
    """Create the repo if needed and upload the whole folder as ONE commit (all or nothing)."""
    from huggingface_hub import HfApi
    api = api or HfApi()  # token from HF_TOKEN or `hf auth login`
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    log(f'uploading {folder} to {repo_id} ({"pull request" if create_pr else revision or "main"})')
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type='model', revision=revision, create_pr=create_pr,
        commit_message=f'Add {folder.name} weights (model.safetensors, config.json, model card)')
