"""The detectors of timm_epsanet.detection: they train, evaluate, load classification checkpoints
into their backbone, freeze what detection freezes, and match the paper's Table 3 sizes."""
import pytest
import timm
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from timm_epsanet.detection import create_detector, detector_param_count

SMALL = dict(min_size=128, max_size=160)
# fewer proposals and sampled RoIs than COCO's defaults: the same code paths, a fraction of the time
FAST_RCNN = dict(
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64,
)
FAST = {'faster_rcnn': FAST_RCNN, 'mask_rcnn': FAST_RCNN, 'retinanet': {}}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: two OpenMP threads spin on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(kind, num_images=2, size=128, generator=None):
    """Images with a bright rectangle per object, its box, label and mask."""
    images, targets = [], []
    for i in range(num_images):
        image = torch.rand(3, size, size, generator=generator) * 0.2
        boxes = torch.tensor([[16.0, 24.0, 80.0, 96.0], [70.0, 10.0, 120.0, 50.0]][: i + 1])
        masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            image[j % 3, y0:y1, x0:x1] += 0.8
            masks[j, y0:y1, x0:x1] = 1
        target = dict(boxes=boxes, labels=torch.tensor([1, 2][: i + 1]))
        if kind == 'mask_rcnn':
            target['masks'] = masks
        images.append(image)
        targets.append(target)
    return images, targets


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['faster_rcnn', 'mask_rcnn', 'retinanet'])
def test_detector_trains_and_detects(kind):
    """A fixed batch is learned (the loss falls), then eval gives torchvision's detections."""
    torch.manual_seed(0)
    model = create_detector(kind, 'epsanet50_small', num_classes=3, **SMALL, **FAST[kind])
    images, targets = make_batch(kind, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    losses = []
    for _ in range(8):
        loss_dict = model(images, targets)
        if kind == 'mask_rcnn':
            assert 'loss_mask' in loss_dict
        loss = sum(loss_dict.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses

    model.eval()
    with torch.no_grad():
        detections = model(images[:1])
    assert len(detections) == 1
    det = detections[0]
    expected = {'boxes', 'labels', 'scores'} | ({'masks'} if kind == 'mask_rcnn' else set())
    assert set(det) == expected
    n = len(det['scores'])
    assert det['boxes'].shape == (n, 4) and det['labels'].shape == (n,)
    if kind == 'mask_rcnn':
        assert det['masks'].shape == (n, 1, 128, 128)
    # boxes are in the input image's coordinates
    assert bool((det['boxes'] >= 0).all() and (det['boxes'] <= 128).all())


def test_classification_checkpoint_loads_into_backbone(tmp_path, trained_bn):
    """An ImageNet checkpoint goes in through timm's pretrained path, every tensor of it (the
    classifier aside) into the backbone, and the frozen BatchNorm keeps its statistics."""
    torch.manual_seed(0)
    classifier = trained_bn(timm.create_model('epsanet50_small'))
    state_dict = classifier.state_dict()
    path = tmp_path / 'epsanet50_small.pth'
    torch.save(state_dict, path)

    model = create_detector(
        'faster_rcnn', 'epsanet50_small', num_classes=3,
        backbone_kwargs=dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))))
    body = model.backbone.body.state_dict()
    from_file = {k for k in state_dict if not k.startswith('fc.') and not k.endswith('num_batches_tracked')}
    assert set(body) == from_file
    for k, v in body.items():
        torch.testing.assert_close(v, state_dict[k], rtol=0, atol=0, msg=k)


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    path = tmp_path / 'resnet50.pth'
    torch.save(timm.create_model('resnet18').state_dict(), path)
    with pytest.raises((RuntimeError, ValueError), match='does not fit'):
        create_detector(
            'retinanet', 'epsanet50_small',
            backbone_kwargs=dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))))


@pytest.mark.parametrize('trainable_layers, first_trained', [(0, None), (3, 'layer2'), (5, 'conv1')])
def test_frozen_stages_and_batch_norm(trainable_layers, first_trained):
    with torch.device('meta'):
        model = create_detector('faster_rcnn', 'resnet50', trainable_layers=trainable_layers)
    body = model.backbone.body
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    units = ['conv1', 'layer1', 'layer2', 'layer3', 'layer4']
    trained = units[units.index(first_trained):] if first_trained else []
    for name in units:
        grads = {p.requires_grad for p in getattr(body, name).parameters()}
        assert grads == {name in trained}, name
    # the FPN and heads always train
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.roi_heads.parameters())


def test_frozen_stem_of_a_backbone_without_stride_2_features():
    """ConvNeXt's stem has no feature of its own: it is the unit before the stride-4 stage."""
    with torch.device('meta'):
        body = create_detector('retinanet', 'convnext_atto', trainable_layers=4).backbone.body
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith('stem'))
    assert all(p.requires_grad for n, p in body.named_parameters() if not n.startswith('stem'))


def test_batch_norm_frozen_in_train_mode():
    """Train mode neither normalizes with batch statistics nor updates the running ones."""
    model = create_detector('retinanet', 'resnet50', **SMALL)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = [t.clone() for t in model.backbone.body(x)]
        model.train()
        after = model.backbone.body(x)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('kwargs, match', [
    (dict(kind='yolo'), 'unknown kind'),
    (dict(backbone='epsanet50_tiny'), 'not a timm model'),
    (dict(backbone='vit_tiny_patch16_224'), 'strides'),
    (dict(trainable_layers=6), 'trainable_layers'),
    (dict(trainable_layers=-1), 'trainable_layers'),
    (dict(num_classes=0), 'num_classes'),
    (dict(p6_from_c5=True), 'p6_from_c5'),
    (dict(backbone_kwargs=dict(out_indices=(1, 2))), 'out_indices'),
])
def test_bad_arguments_fail_early(kwargs, match):
    args = dict(dict(kind='faster_rcnn', backbone='epsanet50_small'), **kwargs)
    with pytest.raises(ValueError, match=match):
        create_detector(args.pop('kind'), args.pop('backbone'), **args)


# Table 3 of the paper (arXiv:2105.14447), mmdetection: ResNet-50 minus EPSANet(Small)-50, in M
PAPER_RESNET50 = {'faster_rcnn': 41.53, 'mask_rcnn': 44.18, 'retinanet': 37.74}
PAPER_SMALL_SAVING = {'faster_rcnn': 41.53 - 38.56, 'mask_rcnn': 44.18 - 41.20, 'retinanet': 37.74 - 34.78}


@pytest.mark.parametrize('kind', ['faster_rcnn', 'mask_rcnn', 'retinanet'])
def test_small_is_smaller_than_resnet50_by_the_papers_margin(kind):
    """80 COCO classes: the R-CNNs' softmax adds a background class, RetinaNet's sigmoid does not.
    Counted as mmdetection does (frozen stem and stage 1 left out), on the meta device."""
    num_classes = 80 if kind == 'retinanet' else 81
    counts = {}
    for backbone in ('resnet50', 'epsanet50_small'):
        with torch.device('meta'):
            model = create_detector(kind, backbone, num_classes=num_classes)
        counts[backbone] = detector_param_count(model, trained_only=True) / 1e6
    assert counts['resnet50'] - counts['epsanet50_small'] == pytest.approx(PAPER_SMALL_SAVING[kind], abs=0.05)
    # the totals too, where the architecture is mmdetection's (RetinaNet: with its P6)
    if kind == 'retinanet':
        with torch.device('meta'):
            model = create_detector(kind, 'resnet50', num_classes=num_classes, p6_from_c5=True)
        counts['resnet50'] = detector_param_count(model, trained_only=True) / 1e6
    assert counts['resnet50'] == pytest.approx(PAPER_RESNET50[kind], abs=0.01)


@pytest.mark.parametrize('variant', ['epsanet50_small', 'epsanet50_large'])
def test_mmpretrain_timm_backbone_call(variant):
    """The call mmpretrain's TIMMBackbone makes, with the config of docs/detection.md: the FPN
    neck's in_channels and strides 4-32."""
    with torch.device('meta'):
        model = timm.create_model(
            model_name=variant, features_only=True, pretrained=False, in_chans=3, checkpoint_path='',
            out_indices=(1, 2, 3, 4))
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_trained_only_count_leaves_out_exactly_the_frozen_units():
    """As mmdetection's count with frozen_stages=1: stem and stage 1 out, BatchNorm affine included."""
    with torch.device('meta'):
        model = create_detector('faster_rcnn', 'resnet50', trainable_layers=3)
        resnet = timm.create_model('resnet50')
    frozen = sum(p.numel() for name in ('conv1', 'bn1', 'layer1') for p in getattr(resnet, name).parameters())
    assert detector_param_count(model) - detector_param_count(model, trained_only=True) == frozen


@pytest.mark.slow
def test_benchmark_script_writes_results(tmp_path):
    """benchmarks.detection as a user runs it, at a tiny size: both backbones, the machine line."""
    import csv
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / 'detection-cpu.csv'
    subprocess.run([sys.executable, '-m', 'benchmarks.detection', '--height', '64', '--width', '96',
                    '--batch-size', '1', '--kinds', 'retinanet', '--iters', '1', '--warmup', '0', '--out', str(out)],
                   cwd=Path(__file__).parents[1], check=True, timeout=600)
    rows = list(csv.DictReader(out.open()))
    assert {(r['part'], r['backbone']) for r in rows} == {
        (part, b) for part in ('backbone', 'detector') for b in ('epsanet50_small', 'resnet50')}
    assert all(float(r['median_s']) > 0 and r['machine'] and r['date'] for r in rows)
    assert all(r['x_resnet50'] for r in rows)
