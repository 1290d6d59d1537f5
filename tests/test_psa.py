"""PSA layer: paper defaults, config validation, standalone use, and equivalence with the official forward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_epsanet import EPSABottleneck, PyramidSqueezeAttention, default_groups, default_kernel_sizes
from timm_epsanet._branch_conv import BranchConv2d
from timm_epsanet._branch_forms import block_diagonal_weight, fft_weight_grad, fft_weight_grad_pays_off
from timm_epsanet._branch_plans import computes_in_low_precision, cpu_branch_plan


def test_paper_defaults_follow_eq3():
    assert default_kernel_sizes(4) == (3, 5, 7, 9)
    assert default_groups((3, 5, 7, 9)) == (1, 4, 8, 16)
    assert default_kernel_sizes(5) == (3, 5, 7, 9, 11)
    assert default_groups(default_kernel_sizes(5)) == (1, 4, 8, 16, 32)
    psa = PyramidSqueezeAttention(64)
    assert [c.kernel_size for c in psa.convs] == [(3, 3), (5, 5), (7, 7), (9, 9)]
    assert [c.groups for c in psa.convs] == [1, 4, 8, 16]
    assert [c.padding for c in psa.convs] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    # every branch sees all input channels and yields C/S; SE squeezes C' by 16
    assert all(c.in_channels == 64 and c.out_channels == 16 for c in psa.convs)
    assert (psa.se.fc1.in_channels, psa.se.fc1.out_channels) == (16, 1)


@pytest.mark.parametrize('kwargs, message', [
    (dict(in_chs=64, out_chs=66), 'out_chs=66 is not divisible by num_scales=4'),
    (dict(in_chs=36, out_chs=64), 'in_chs=36 is not divisible by groups=8'),
    (dict(in_chs=64, out_chs=32), '32 / 4 = 8 channels are not divisible by groups=16'),
    (dict(in_chs=64, kernel_sizes=(3, 4, 7, 9), groups=(1, 1, 1, 1)), 'kernel size 4 must be odd'),
    (dict(in_chs=64, num_scales=3, kernel_sizes=(3, 5, 7, 9)), '4 kernel sizes (3, 5, 7, 9) for num_scales=3'),
    (dict(in_chs=64, kernel_sizes=(3, 5, 7, 9), groups=(1, 4, 8)), '3 group sizes (1, 4, 8) for num_scales=4'),
    (dict(in_chs=64, se_reduction=0), 'se_reduction must be >= 1, got 0'),
    (dict(in_chs=30), 'in_chs (the default out_chs)=30 is not divisible by num_scales=4'),
    (dict(in_chs=0), 'in_chs must be a positive integer, got 0'),
    (dict(in_chs=-16), 'in_chs must be a positive integer, got -16'),
    (dict(in_chs=64, out_chs=0), 'out_chs must be a positive integer, got 0'),
    (dict(in_chs=64, stride=0), 'stride must be a positive integer, got 0'),
    (dict(in_chs=64, dilation=0), 'dilation must be a positive integer, got 0'),
    (dict(in_chs=64, branch_form='fast'), "branch_form must be one of ('auto', 'grouped', 'depthwise', 'volumetric', 'dense', 'triton'), got 'fast'"),
])
def test_invalid_config_names_the_numbers(kwargs, message):
    with pytest.raises(ValueError) as info:
        PyramidSqueezeAttention(**kwargs)
    assert message in str(info.value)


def test_standalone_in_another_cnn():
    """Any in/out channel count that fits S and the groups works, with stride, inside a plain CNN."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1),
        PyramidSqueezeAttention(48, 96, stride=2, kernel_sizes=(3, 5, 7), groups=(1, 2, 4)),
        nn.ReLU(),
        PyramidSqueezeAttention(96, 40, num_scales=2, se_reduction=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(40, 5),
    )
    x = torch.randn(4, 3, 17, 17)
    y = net(x)
    assert y.shape == (4, 5)
    assert net[1](net[0](x)).shape == (4, 96, 9, 9)
    F.cross_entropy(y, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_scale_weights_are_a_softmax_across_scales():
    """With identical branches the softmax gives every scale 1/S: output = branch output / S."""
    psa = PyramidSqueezeAttention(16, 32, kernel_sizes=(3, 3, 3, 3), groups=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        for conv in psa.convs[1:]:
            conv.weight.copy_(psa.convs[0].weight)
        x = torch.randn(2, 16, 8, 8)
        y = psa(x)
        branch = psa.convs[0](x)
    for i in range(4):
        torch.testing.assert_close(y[:, 8 * i:8 * (i + 1)], branch / 4)


class OfficialSEWeight(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class OfficialPSA(nn.Module):
    """The official forward, spelled out: one SE per branch call, softmax over the branch axis,
    then the weighted branches concatenated LAST FIRST (branch 3, 2, 1, 0)."""

    def __init__(self, inplanes, planes, stride, kernels, groups):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(inplanes, planes // 4, k, stride=stride, padding=k // 2, groups=g, bias=False)
            for k, g in zip(kernels, groups)])
        self.se = OfficialSEWeight(planes // 4)
        self.split = planes // 4

    def forward(self, x):
        feats = [conv(x) for conv in self.convs]
        b, _, h, w = feats[0].shape
        stacked = torch.cat(feats, 1).view(b, 4, self.split, h, w)
        weights = torch.cat([self.se(f) for f in feats], 1).view(b, 4, self.split, 1, 1)
        weighted = stacked * weights.softmax(dim=1)
        out = weighted[:, 0]
        for i in range(1, 4):
            out = torch.cat((weighted[:, i], out), 1)
        return out


class OfficialBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, kernels, groups, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = OfficialPSA(planes, planes, stride, kernels, groups)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


def _official_from_ours(block: EPSABottleneck, inplanes, planes, stride) -> OfficialBlock:
    """Copy our weights into the reference; the channels after PSA are in reversed branch order there."""
    psa = block.conv2
    ref = OfficialBlock(inplanes, planes, stride, psa.kernel_sizes, psa.groups, block.downsample)
    split = planes // 4
    order = torch.cat([torch.arange(i * split, (i + 1) * split) for i in reversed(range(4))])
    with torch.no_grad():
        ref.conv1.weight.copy_(block.conv1.weight)
        for ours, theirs in zip(psa.convs, ref.conv2.convs):
            theirs.weight.copy_(ours.weight)
        for name in ('fc1', 'fc2'):
            getattr(ref.conv2.se, name).load_state_dict(getattr(psa.se, name).state_dict())
        ref.conv3.weight.copy_(block.conv3.weight[:, order])
        for ours_bn, ref_bn, idx in ((block.bn1, ref.bn1, None), (block.bn2, ref.bn2, order), (block.bn3, ref.bn3, None)):
            for key, value in ours_bn.state_dict().items():
                getattr(ref_bn, key).copy_(value if idx is None or value.ndim == 0 else value[idx])
    return ref


def _randomize_bn(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize('inplanes, planes, stride, groups', [
    (256, 64, 1, (1, 4, 8, 16)),   # Small, stage 1
    (256, 128, 2, (1, 4, 8, 16)),  # Small, first block of stage 2 (strided PSA + downsample)
    (512, 128, 2, (1, 2, 4, 8)),   # another group config
])
@pytest.mark.parametrize('train', [False, True])
def test_block_matches_official_forward(inplanes, planes, stride, groups, train):
    torch.manual_seed(0)
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
    block = EPSABottleneck(inplanes, planes, stride, downsample, psa_groups=groups)
    _randomize_bn(block)
    ref = _official_from_ours(block, inplanes, planes, stride)
    block.train(train)
    ref.train(train)
    x = torch.randn(2, inplanes, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('in_chs, out_chs, k, groups, stride', [
    (64, 16, 9, 16, 1),   # 1 output per group
    (64, 16, 7, 8, 2),    # 2 outputs per group, strided
    (128, 32, 7, 8, 1),   # 4 outputs per group
])
@pytest.mark.parametrize('form', ['depthwise', 'volumetric', 'dense'])
def test_branch_form_equals_grouped_conv(form, channels_last, in_chs, out_chs, k, groups, stride):
    """BranchConv2d's depthwise, volumetric and dense forms: same output, memory layout and
    gradients as the grouped conv."""
    torch.manual_seed(0)
    fast = BranchConv2d(in_chs, out_chs, k, stride=stride, padding=k // 2, groups=groups, bias=False, form=form)
    plain = BranchConv2d(in_chs, out_chs, k, stride=stride, padding=k // 2, groups=groups, bias=False, form='grouped')
    assert fast.plan_for('cpu', True)[0] == form and plain.plan_for('cpu', True)[0] == 'grouped'
    plain.load_state_dict(fast.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, in_chs, 15, 15).contiguous(memory_format=fmt)
    with torch.no_grad():
        y_fast, y_plain = fast(x), plain(x)
    if form == 'depthwise':
        assert not torch.equal(y_fast, y_plain)  # a different computation...
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)  # ...of the same function
    assert y_fast.is_contiguous(memory_format=fmt)
    # training (depthwise, volumetric: their forward, the grouped conv's backward)
    x.requires_grad_()
    y_fast, y_plain = fast(x), plain(x)
    assert y_fast.grad_fn is not None
    node = y_fast.grad_fn  # the volumetric form's NCHW output is copied back to a channels-last input's layout
    node = node.next_functions[0][0] if type(node).__name__ == 'CloneBackward0' else node
    assert ('FastForm' in type(node).__name__) == (form in ('depthwise', 'volumetric'))
    assert y_fast.is_contiguous(memory_format=fmt)
    if form == 'dense':  # the conv's weight is the block-diagonal expansion, not the parameter itself
        assert type(y_fast.grad_fn.next_functions[1][0]).__name__ != 'AccumulateGrad'
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y_plain)
    for a, b in zip(torch.autograd.grad(y_fast, (x, fast.weight), grad), torch.autograd.grad(y_plain, (x, plain.weight), grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # sums of 450 products: float order


@pytest.mark.parametrize('in_chs, out_chs, k, groups, padding, hw', [
    (64, 16, 9, 16, (4, 4), (30, 29)),   # stage 1 of Small: 1 output per group
    (32, 16, 9, 8, (4, 4), (30, 29)),    # 2 outputs per group
    (8, 4, (5, 3), 2, (1, 2), (30, 29)), # rectangular kernel, padding other than k // 2
    (8, 4, 3, 2, (0, 0), (30, 29)),      # no padding: only non-negative lags
    (8, 4, 3, 2, (3, 2), (30, 29)),      # padding beyond the kernel: outputs larger than the input
    (8, 4, 9, 2, (4, 4), (3, 2)),        # input smaller than the kernel: the period is the kernel's
])
def test_fft_weight_grad_equals_the_convs(in_chs, out_chs, k, groups, padding, hw):
    torch.manual_seed(0)
    k_h, k_w = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, in_chs, *hw)
    w = torch.randn(out_chs, in_chs // groups, k_h, k_w)
    grad_out = torch.randn_like(F.conv2d(x, w, None, 1, padding, 1, groups))
    expected = torch.ops.aten.convolution_backward(
        grad_out, x, w, None, [1, 1], list(padding), [1, 1], False, [0, 0], groups, [False, True, False])[1]
    got = fft_weight_grad(x, grad_out, (k_h, k_w), padding, groups)
    assert got.shape == w.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_group_sum_weights_are_a_buffer_built_once_and_rebuilt_by_timms_hook():
    """Stage 1's depthwise form sums groups with 0/1 weights held as a non-persistent buffer: the
    forward uses it (no rebuild per call), it stays out of the state dict, follows the module's
    dtype, and timm's reinit_non_persistent_buffers restores it after a meta-device build."""
    from timm.models._manipulate import reinit_non_persistent_buffers
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(64).eval()
    assert [c.group_sum_weight is not None for c in psa.convs] == [False, True, True, True]  # branch 0 is dense
    assert not any('group_sum_weight' in k for k in psa.state_dict())
    assert psa.to(torch.bfloat16).convs[3].group_sum_weight.dtype == torch.bfloat16
    psa.float()
    x = torch.randn(2, 64, 12, 12)
    conv = psa.convs[1]  # 5x5, 4 groups, 4 outputs per group
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight, None, 1, 2, 1, 4)
        torch.testing.assert_close(conv.forward_as(x, 'depthwise'), expected, rtol=1e-5, atol=1e-5)
        saved = conv.group_sum_weight.clone()
        conv.group_sum_weight.zero_()
        assert conv.forward_as(x, 'depthwise').abs().max() == 0  # the buffer is what the forward sums with
        conv.group_sum_weight.copy_(saved)

    meta = PyramidSqueezeAttention(64, device='meta').to_empty(device='cpu').eval()
    meta.load_state_dict(psa.state_dict())
    assert 'convs.1' in reinit_non_persistent_buffers(meta)
    for a, b in zip(meta.convs, psa.convs):
        if b.group_sum_weight is not None:
            assert torch.equal(a.group_sum_weight, b.group_sum_weight)
    with torch.no_grad():
        torch.testing.assert_close(meta(x), psa(x))


def test_depthwise_form_training_takes_the_fft_weight_grad_where_it_pays():
    """9x9 branch of stage 1 in training: depthwise forward, FFT weight gradient; same gradients
    as the grouped conv. Strided, 5x5, bf16 and small inputs keep oneDNN's weight gradient."""
    torch.manual_seed(0)
    fast = BranchConv2d(64, 16, 9, padding=4, groups=16, bias=False, form='depthwise')
    plain = BranchConv2d(64, 16, 9, padding=4, groups=16, bias=False, form='grouped')
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    assert fft_weight_grad_pays_off(x, fast.weight, (1, 1), (1, 1))
    assert not fft_weight_grad_pays_off(x, fast.weight, (2, 2), (1, 1))
    assert not fft_weight_grad_pays_off(x[..., :14, :14], fast.weight, (1, 1), (1, 1))
    assert not fft_weight_grad_pays_off(x.bfloat16(), fast.weight, (1, 1), (1, 1))
    assert fft_weight_grad_pays_off(x, torch.empty(16, 8, 7, 7), (1, 1), (1, 1))
    assert not fft_weight_grad_pays_off(x, torch.empty(16, 16, 5, 5), (1, 1), (1, 1))
    grads = []
    for conv in (fast, plain):
        x_in = x.clone().requires_grad_()
        y = conv(x_in)
        y.square().sum().backward()
        grads.append((x_in.grad, conv.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_depthwise_form_under_autocast_matches_grouped_conv():
    """AMP training: the depthwise path casts like autocast casts a conv, and its backward runs in
    that dtype (a mixed fp16/fp32 backward conv fails on CUDA); gradients reach fp32 parameters."""
    torch.manual_seed(0)
    fast = BranchConv2d(64, 16, 9, padding=4, groups=16, bias=False, form='depthwise')
    plain = BranchConv2d(64, 16, 9, padding=4, groups=16, bias=False, form='grouped')
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 64, 12, 12)
    grads = []
    for conv in (fast, plain):
        x_in = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = conv(x_in)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert conv.weight.grad.dtype == torch.float32 and x_in.grad.dtype == torch.float32
        grads.append((y.float(), x_in.grad, conv.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_branch_weights_stay_nchw_when_the_model_goes_channels_last():
    """Branches that run NCHW need an NCHW weight (oneDNN goes channels-last if the weight is): a
    channels-last conversion leaves branch weights NCHW, and the output is unchanged."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(256).eval()
    x = torch.randn(2, 256, 14, 14)
    with torch.no_grad():
        expected = psa(x)
        psa.to(memory_format=torch.channels_last)
        y = psa(x.contiguous(memory_format=torch.channels_last))
    assert all(conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
               for conv in psa.convs)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    psa.to(torch.float64)
    assert all(conv.weight.is_contiguous() and conv.weight.dtype == torch.float64 for conv in psa.convs)


def test_branch_plan_choice():
    """'auto' on CPU: the depthwise form channels-last for few outputs per group; NCHW grouped
    convs for >= 32 inputs per group and kernels >= 5 (inference); else channels-last, the dense
    branch in whichever layout the others use; bf16 depthwise only for k >= 5 and <= 2 outputs.
    On CUDA the dense form for inference with <= 16 groups, else the grouped conv, in the caller's
    layout; an explicit form applies everywhere."""
    cl, nchw, any_ = ('grouped', 'channels_last'), ('grouped', 'nchw'), ('grouped', 'any')
    dw = ('depthwise', 'channels_last')
    assert cpu_branch_plan(9, 4, 1) == dw and cpu_branch_plan(7, 8, 2) == dw and cpu_branch_plan(3, 4, 1) == dw
    assert cpu_branch_plan(5, 16, 4) == dw and cpu_branch_plan(7, 16, 4) == dw and cpu_branch_plan(3, 16, 4) == cl
    assert cpu_branch_plan(5, 32, 8) == nchw and cpu_branch_plan(9, 32, 8) == nchw and cpu_branch_plan(7, 16, 8) == cl
    assert cpu_branch_plan(9, 1, 1) == any_
    # inference with >= 16 groups and 2-4 outputs each: the volumetric form (stages 2-3), not when strided
    vol = ('volumetric', 'nchw')
    assert cpu_branch_plan(9, 8, 2, groups=16) == vol and cpu_branch_plan(9, 16, 4, groups=16) == vol
    assert cpu_branch_plan(3, 8, 2, groups=32) == vol and cpu_branch_plan(9, 8, 2, groups=8) == dw
    assert cpu_branch_plan(9, 4, 1, groups=16) == dw and cpu_branch_plan(9, 32, 8, groups=16) == nchw
    assert cpu_branch_plan(9, 8, 2, groups=16, stride=2) == dw and cpu_branch_plan(9, 8, 2, groups=16, training=True) == dw
    # strided: NCHW grouped convs from 16 inputs per group, with up to 16 groups
    assert cpu_branch_plan(7, 16, 4, groups=8, stride=2) == nchw and cpu_branch_plan(9, 16, 4, groups=16, stride=2) == nchw
    assert cpu_branch_plan(7, 16, 4, groups=32, stride=2) == dw and cpu_branch_plan(7, 16, 4, groups=8) == dw
    assert cpu_branch_plan(7, 16, 4, groups=8, stride=2, training=True) == dw
    # training: NCHW's backward wins by less, and not after a convert: the caller's layout
    assert cpu_branch_plan(5, 32, 8, training=True) == any_ and cpu_branch_plan(9, 4, 1, training=True) == dw
    # bf16: depthwise only for kernels >= 5 with 1-2 outputs per group, always channels-last
    assert cpu_branch_plan(9, 4, 1, low_precision=True) == dw and cpu_branch_plan(5, 8, 2, low_precision=True) == dw
    assert cpu_branch_plan(5, 16, 4, low_precision=True) == cl and cpu_branch_plan(3, 4, 1, low_precision=True) == cl

    small = PyramidSqueezeAttention(64)  # stage 1 of Small: 4 outputs per group for k=5, 2 for k=7, 1 for k=9
    for grad in (False, True):
        assert [c.plan_for('cpu', grad) for c in small.convs] == [any_, dw, dw, dw]
    assert [c.plan_for('cpu', False) for c in PyramidSqueezeAttention(512).convs] == [any_, nchw, nchw, nchw]
    assert [c.plan_for('cpu', False) for c in PyramidSqueezeAttention(128).convs] == [any_, nchw, dw, vol]
    assert [c.plan_for('cpu', False) for c in PyramidSqueezeAttention(128, stride=2).convs] == [any_, nchw, nchw, dw]
    assert [c.plan_for('cpu', True) for c in PyramidSqueezeAttention(128).convs] == [any_, any_, dw, dw]
    assert BranchConv2d(64, 16, 9, padding=4, groups=16, bias=False, form='volumetric').plan_for('cpu', False) == vol  # forced: NCHW
    assert [c.plan_for('cpu', False, low_precision=True) for c in small.convs] == [cl, cl, dw, dw]
    for grad in (False, True):
        assert [c.plan_for('mps', grad) for c in small.convs] == [('grouped', 'any')] * 4
    assert [c.plan_for('cuda', False)[0] for c in small.convs] == ['grouped', 'dense', 'dense', 'dense']
    assert [c.plan_for('cuda', True)[0] for c in small.convs] == ['grouped'] * 4
    large = PyramidSqueezeAttention(128, groups=(32,) * 4)
    assert [c.plan_for('cuda', False)[0] for c in large.convs] == ['grouped'] * 4
    dense = PyramidSqueezeAttention(64, branch_form='dense')
    assert [c.plan_for('cuda', True)[0] for c in dense.convs] == ['grouped', 'dense', 'dense', 'dense']  # branch 0 is dense already
    assert [c.plan_for('cpu', True) for c in dense.convs] == [any_] + [('dense', 'channels_last')] * 3
    with pytest.raises(ValueError, match="form must be one of .* got 'fast'"):
        PyramidSqueezeAttention(64, branch_form='fast')


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('chs', [128, 512])
def test_psa_mixed_branch_layouts_keep_the_callers_layout(chs, channels_last):
    """On CPU the branches of one PSA run in different layouts and forms (stage 2: NCHW grouped
    5x5, channels-last depthwise 7x7 and 9x9); the output equals plain grouped convs' and comes
    back in the caller's layout, at inference and in training (values and gradients)."""
    torch.manual_seed(0)
    fast = PyramidSqueezeAttention(chs)
    plain = PyramidSqueezeAttention(chs, branch_form='grouped')
    plain.load_state_dict(fast.state_dict())
    assert {c.plan_for('cpu', False)[1] for c in fast.convs} == {'any', 'nchw'} | ({'channels_last'} if chs == 128 else set())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast, plain = fast.to(memory_format=fmt), plain.to(memory_format=fmt)
    x = torch.randn(2, chs, 12, 12).contiguous(memory_format=fmt)
    with torch.inference_mode():
        y_fast, y_plain = fast(x), plain(x)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    assert y_fast.is_contiguous(memory_format=fmt)
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_plain = fast(x_fast), plain(x_plain)
    assert y_fast.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(y_plain)
    (y_fast * grad).sum().backward()
    (y_plain * grad).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_block_diagonal_weight():
    w = torch.randn(6, 2, 3, 3)  # 3 groups, 2 outputs and 2 inputs each
    dense = block_diagonal_weight(w, 3)
    assert dense.shape == (6, 6, 3, 3)
    for g in range(3):
        for h in range(3):
            block = dense[2 * g:2 * g + 2, 2 * h:2 * h + 2]
            assert torch.equal(block, w[2 * g:2 * g + 2] if g == h else torch.zeros_like(block))


def test_inference_reweights_in_place_but_training_keeps_autograd():
    psa = PyramidSqueezeAttention(32, kernel_sizes=(3, 5), groups=(1, 2)).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        y_inplace = psa(x)
    x_grad = x.clone().requires_grad_()
    y = psa(x_grad)
    torch.testing.assert_close(y_inplace, y.detach())
    y.sum().backward()
    assert x_grad.grad is not None


@pytest.mark.parametrize('mode', ['fp32', 'autocast', 'bf16'])
def test_branch_form_follows_the_compute_dtype(mode):
    """On CPU the 3x3 branch of EPSANet Large's stage 1 runs in depthwise form in fp32 but not
    in bf16, where oneDNN's depthwise convs are slower; every form gives the grouped conv's result."""
    torch.manual_seed(0)
    conv = BranchConv2d(128, 32, 3, padding=1, groups=32, bias=False)
    x = torch.randn(2, 128, 10, 10)
    if mode == 'bf16':
        conv, x = conv.to(torch.bfloat16), x.to(torch.bfloat16)
    calls = []
    conv.register_forward_hook(lambda m, inp, out: calls.append(computes_in_low_precision(inp[0])))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'autocast'):
        y = conv(x)
        expected = F.conv2d(x, conv.weight, None, 1, 1, 1, 32)
    assert calls == [mode != 'fp32']
    assert conv.plan_for('cpu', False, calls[0])[0] == ('depthwise' if mode == 'fp32' else 'grouped')
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)
