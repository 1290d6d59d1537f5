"""What timm's train.py does, through timm's public training API: data, optimizer, scheduler,
label smoothing, AMP, EMA, checkpoint/resume and validate.py's checkpoint loading, on CPU."""
from argparse import Namespace

import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageDataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3

import timm_epsanet  # noqa: F401

NUM_CLASSES = 4
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40)]


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """An ImageFolder with 4 classes of 2 images each: a coloured square on noise."""
    root = tmp_path_factory.mktemp('imagefolder')
    gen = torch.Generator().manual_seed(0)
    for label, colour in enumerate(COLOURS):
        (root / f'class{label}').mkdir()
        for i in range(2):
            noise = (torch.rand(72, 72, 3, generator=gen) * 80).to(torch.uint8).numpy()
            img = Image.fromarray(noise)
            img.paste(colour, (12 + 8 * i, 12, 52 + 8 * i, 52))
            img.save(root / f'class{label}' / f'{i}.png')
    return root


def _train(model, loader, steps, amp):
    optimizer = create_optimizer_v2(model, opt='sgd', lr=0.02, momentum=0.9, weight_decay=1e-4)
    scheduler, _ = create_scheduler_v2(optimizer, sched='step', num_epochs=100, decay_epochs=30, decay_milestones=(30,))
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    ema = ModelEmaV3(model, decay=0.9)
    images, targets = next(iter(loader))
    model.train()
    losses = []
    for step in range(steps):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=step)
        scheduler.step_update(step + 1)
        losses.append(loss.item())
    scheduler.step(1)
    return optimizer, ema, losses


@pytest.mark.parametrize('amp', [False, True])
def test_overfits_a_batch_like_train_py(image_folder, amp):
    torch.manual_seed(0)
    model = timm.create_model('epsanet50_small', num_classes=NUM_CLASSES, drop_path_rate=0.05)
    data_config = resolve_data_config(model=model)
    loader = create_loader(
        ImageDataset(str(image_folder)), input_size=(3, 64, 64), batch_size=8, is_training=True,
        mean=data_config['mean'], std=data_config['std'], interpolation='bilinear', num_workers=0,
        use_prefetcher=False, device=torch.device('cpu'), hflip=0.5, color_jitter=0.0)
    _, _, losses = _train(model, loader, steps=20, amp=amp)
    assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_resume_and_validate_loading(image_folder, tmp_path):
    """train.py's CheckpointSaver output resumes (weights, optimizer, epoch) and loads like validate.py."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50_small', num_classes=NUM_CLASSES)
    loader = create_loader(
        ImageDataset(str(image_folder)), input_size=(3, 64, 64), batch_size=8, num_workers=0,
        use_prefetcher=False, device=torch.device('cpu'))
    optimizer, ema, _ = _train(model, loader, steps=2, amp=False)
    saver = CheckpointSaver(
        model, optimizer, args=Namespace(model='epsanet50_small'), model_ema=ema, checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(epoch=3, metric=1.0)
    path = tmp_path / 'last.pth.tar'
    assert path.is_file()

    resumed = timm.create_model('epsanet50_small', num_classes=NUM_CLASSES)
    resumed_opt = create_optimizer_v2(resumed, opt='sgd', lr=0.05, momentum=0.9, weight_decay=1e-4)
    start_epoch = timm.models.resume_checkpoint(resumed, str(path), optimizer=resumed_opt, log_info=False)
    assert start_epoch == 4
    assert resumed_opt.state_dict()['state'].keys() == optimizer.state_dict()['state'].keys()

    images, _ = next(iter(loader))
    model.eval()
    resumed.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed(images), model(images))
        validated = timm.create_model('epsanet50_small', num_classes=NUM_CLASSES, checkpoint_path=str(path)).eval()
        torch.testing.assert_close(validated(images), ema.module.eval()(images))  # validate.py prefers EMA


def test_largest_variant_trains_a_step():
    torch.manual_seed(0)
    model = timm.create_model('epsanet101_large', num_classes=3, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    optimizer = create_optimizer_v2(model, opt='sgd', lr=0.01, momentum=0.9)
    before = model.layer3[22].bn3.weight.detach().clone()  # zero-initialised last BN of the block
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert not torch.equal(before, model.layer3[22].bn3.weight)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
