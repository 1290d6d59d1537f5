"""The train.py recipes say what the paper says (section 4.1) and name models and options that exist."""
from pathlib import Path

import pytest
import timm
import yaml

import timm_epsanet  # noqa: F401

RECIPES = Path(__file__).resolve().parents[1] / 'recipes'


def load(name):
    return yaml.safe_load((RECIPES / name).read_text())


@pytest.mark.parametrize('name', ['imagenet_paper.yaml', 'cifar100_ablation.yaml'])
def test_paper_settings(name):
    cfg = load(name)
    assert (cfg['opt'], cfg['momentum'], cfg['weight_decay']) == ('sgd', 0.9, 1e-4)
    assert (cfg['lr_base'], cfg['lr_base_size'], cfg['lr_base_scale']) == (0.1, 256, 'linear')
    assert (cfg['sched'], cfg['decay_epochs'], cfg['decay_rate'], cfg['epochs']) == ('step', 30, 0.1, 100)
    assert (cfg['warmup_epochs'], cfg['cooldown_epochs']) == (0, 0)
    assert cfg['smoothing'] == 0.1 and cfg['img_size'] == 224 and cfg['hflip'] == 0.5
    # "standard" augmentation only
    assert cfg['color_jitter'] == 0 and cfg['aa'] is None and cfg['mixup'] == cfg['cutmix'] == cfg['reprob'] == 0


def test_imagenet_batch_is_256_on_8_gpus():
    assert load('imagenet_paper.yaml')['batch_size'] * 8 == 256


def test_cifar_head_matches_table7():
    cfg = load('cifar100_ablation.yaml')
    assert cfg['num_classes'] == 100 and cfg['dataset'] == 'torch/cifar100'
    model = timm.create_model(cfg['model'], num_classes=cfg['num_classes'], device='meta')
    params = sum(p.numel() for p in model.parameters())
    assert params == 20_717_615 and int(params / 1e4) / 100 == 20.71  # Table 7 truncates: 20.71M (SPC+SE)


@pytest.mark.parametrize('name', ['imagenet_paper.yaml', 'cifar100_ablation.yaml', 'imagenet_modern.yaml'])
def test_models_exist(name):
    assert timm.is_model(load(name)['model'])
