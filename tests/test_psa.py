"""PSA layer: paper defaults, config validation, standalone use, the official forward's function, and every branch form and plan computing the plain grouped conv."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_epsanet import PyramidSqueezeAttention, default_groups, default_kernel_sizes
from timm_epsanet._branch_conv import BRANCH_FORMS, BranchConv2d
from timm_epsanet._branch_forms import block_diagonal_weight, fft_weight_grad, fft_weight_grad_pays_off, regroup_factor
from timm_epsanet._official import OfficialPSA
from timm_epsanet.epsanet import LARGE_GROUPS, SMALL_GROUPS


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
    (dict(in_chs=64, branch_form='fast'), "branch_form must be one of ('auto', 'grouped', 'depthwise', 'volumetric', 'dense', 'regrouped', 'triton', 'triton_mma', 'triton_spc'), got 'fast'"),
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


@pytest.mark.parametrize('chs, stride, groups', [
    (64, 1, (1, 4, 8, 16)),   # Small, stage 1
    (128, 2, (1, 4, 8, 16)),  # Small, first block of stage 2 (strided)
    (128, 2, (1, 2, 4, 8)),   # another group config
])
@pytest.mark.parametrize('grad', [False, True])
def test_psa_matches_official_forward(chs, stride, groups, grad):
    """The official PSAModule's function, with the same weights: its output holds our branches
    last first. At inference and in training, values and gradients."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(chs, stride=stride, groups=groups)
    official = OfficialPSA.sharing_weights(psa)
    x = torch.randn(2, chs, 20, 20, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        ours = torch.cat(psa(x).chunk(4, dim=1)[::-1], dim=1)
        theirs = official(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if grad:
        inputs, grad_out = (x, *psa.parameters()), torch.randn_like(theirs)
        for a, b in zip(torch.autograd.grad(ours, inputs, grad_out), torch.autograd.grad(theirs, inputs, grad_out)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('in_chs, out_chs, k, groups, stride, dilation', [
    (64, 16, 9, 16, 1, 1),   # 1 output per group
    (64, 16, 7, 8, 2, 1),    # 2 outputs per group, strided
    (128, 32, 7, 8, 1, 1),   # 4 outputs per group
    (48, 12, 5, 4, 1, 2),    # 3 outputs per group (regrouped: all 4 merged), dilated
])
@pytest.mark.parametrize('form', ['depthwise', 'volumetric', 'dense', 'regrouped'])
def test_branch_form_equals_grouped_conv(form, channels_last, in_chs, out_chs, k, groups, stride, dilation):
    """BranchConv2d's depthwise, volumetric, dense and regrouped forms: same output, memory layout
    and gradients as the grouped conv."""
    torch.manual_seed(0)
    kwargs = dict(stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False)
    fast = BranchConv2d(in_chs, out_chs, k, form=form, **kwargs)
    plain = BranchConv2d(in_chs, out_chs, k, form='grouped', **kwargs)
    assert fast.plan_for('cpu', True)[0] == form and plain.plan_for('cpu', True)[0] == 'grouped'
    plain.load_state_dict(fast.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, in_chs, 15, 15).contiguous(memory_format=fmt)
    with torch.no_grad():
        y_fast, y_plain = fast(x), plain(x)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    assert y_fast.is_contiguous(memory_format=fmt)
    # training (depthwise, volumetric: their forward, the grouped conv's backward)
    x.requires_grad_()
    y_fast, y_plain = fast(x), plain(x)
    assert y_fast.is_contiguous(memory_format=fmt)
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


def test_group_sum_weights_stay_out_of_checkpoints_and_survive_a_meta_device_build():
    """The depthwise form sums groups with 0/1 weights held as a non-persistent buffer: it stays out
    of the state dict, follows the module's dtype, and timm's reinit_non_persistent_buffers restores
    it after a meta-device build (the output is then the original module's)."""
    from timm.models._manipulate import reinit_non_persistent_buffers
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(64).eval()
    assert not any('group_sum_weight' in k for k in psa.state_dict())
    assert psa.to(torch.bfloat16).convs[3].group_sum_weight.dtype == torch.bfloat16
    psa.float()
    meta = PyramidSqueezeAttention(64, device='meta').to_empty(device='cpu').eval()
    meta.load_state_dict(psa.state_dict())
    assert 'convs.1' in reinit_non_persistent_buffers(meta)
    x = torch.randn(2, 64, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(meta(x), psa(x))
        for conv in psa.convs:  # and each branch's depthwise form is its grouped conv
            torch.testing.assert_close(conv.forward_as(x, 'depthwise'), conv.forward_as(x, 'grouped'),
                                       rtol=1e-5, atol=1e-5)


def test_depthwise_form_training_takes_the_fft_weight_grad_where_it_pays():
    """9x9 branch of stage 1 in training: depthwise forward, FFT weight gradient; same gradients
    as the grouped conv."""
    torch.manual_seed(0)
    fast = BranchConv2d(64, 16, 9, padding=4, groups=16, bias=False, form='depthwise')
    plain = BranchConv2d(64, 16, 9, padding=4, groups=16, bias=False, form='grouped')
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    assert fft_weight_grad_pays_off(x, fast.weight, (1, 1), (1, 1))  # so this test covers the FFT path
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


def _epsanet_psa_shapes():
    """(groups, width, stride) of every PSA in EPSANet Small and Large: 4 stages, strided first blocks."""
    for groups, widen in ((SMALL_GROUPS, 1), (LARGE_GROUPS, 2)):
        for stage, width in enumerate((64, 128, 256, 512)):
            for stride in ((1,) if stage == 0 else (1, 2)):
                yield groups, width * widen, stride


@pytest.mark.parametrize('mode', ['infer', 'train', 'bf16'])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('groups, chs, stride', list(_epsanet_psa_shapes()))
@pytest.mark.parametrize('form', ['auto', 'regrouped'])
def test_every_epsanet_psa_equals_plain_grouped_convs(form, groups, chs, stride, channels_last, mode):
    """Whatever form and layout each branch runs in on CPU (they differ by shape, stride, training
    and precision; 'regrouped' forced, as a GPU may run it), a PSA computes what plain grouped
    convs compute, values and gradients, and returns the caller's memory layout."""
    torch.manual_seed(0)
    fast = PyramidSqueezeAttention(chs, stride=stride, groups=groups, branch_form=form)
    plain = PyramidSqueezeAttention(chs, stride=stride, groups=groups, branch_form='grouped')
    plain.load_state_dict(fast.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast, plain = fast.to(memory_format=fmt), plain.to(memory_format=fmt)
    x = torch.randn(2, chs, 7 * stride, 7 * stride).contiguous(memory_format=fmt)
    if mode != 'train':
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'bf16'):
            y_fast, y_plain = fast(x), plain(x)
        tol = 2e-2 if mode == 'bf16' else 1e-5
        torch.testing.assert_close(y_fast.float(), y_plain.float(), rtol=tol, atol=tol)
        assert y_fast.is_contiguous(memory_format=fmt)
        return
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_plain = fast(x_fast), plain(x_plain)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    assert y_fast.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(y_plain)
    (y_fast * grad).sum().backward()
    (y_plain * grad).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('form', ['depthwise', 'volumetric', 'dense', 'regrouped'])
def test_explicit_branch_form_computes_the_same_psa(form):
    """`branch_form` forces one form on every reformulable branch, on every device; same function."""
    torch.manual_seed(0)
    forced = PyramidSqueezeAttention(128, branch_form=form)
    plain = PyramidSqueezeAttention(128, branch_form='grouped')
    plain.load_state_dict(forced.state_dict())
    assert {c.plan_for('cpu', False)[0] for c in forced.convs} == {'grouped', form}  # branch 0 has one group
    x = torch.randn(2, 128, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(forced(x), plain(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(forced(x).square().sum(), x)[0],
                               torch.autograd.grad(plain(x).square().sum(), x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('form', BRANCH_FORMS)
def test_every_branch_form_runs_on_the_meta_device(form):
    """A model is shaped, and its FLOPs counted, on the meta device, which has no autocast: every
    form gives the shapes there, forward and backward, not torch's error for autocast's device."""
    psa = PyramidSqueezeAttention(64, stride=2, branch_form=form, device='meta')
    x = torch.empty(2, 64, 9, 9, device='meta', requires_grad=True)
    with torch.no_grad():
        assert psa(x).shape == (2, 64, 5, 5)
    psa(x).sum().backward()
    assert x.grad.shape == x.shape and all(c.weight.grad.shape == c.weight.shape for c in psa.convs)


@pytest.mark.parametrize('merge', [None, 3, 2, 1])
def test_block_diagonal_weight(merge):
    """6 groups of 2 outputs and 2 inputs: merged 3, 2 or 1 at a time, or all (dense), each merged
    group's weight holds its groups' blocks on the diagonal and zeros elsewhere."""
    w = torch.randn(12, 2, 3, 3)
    m = 6 if merge is None else merge
    merged = block_diagonal_weight(w, 6, merge)
    assert merged.shape == (12, 2 * m, 3, 3)
    for g in range(6):  # output block of group g, against every input block of its merged group
        for h in range(m):
            block = merged[2 * g:2 * g + 2, 2 * h:2 * h + 2]
            assert torch.equal(block, w[2 * g:2 * g + 2] if g % m == h else torch.zeros_like(block))


@pytest.mark.parametrize('groups, outs, merge', [
    (16, 1, 8), (16, 2, 4), (16, 4, 2), (16, 8, 1), (32, 1, 8), (4, 16, 1),
    (4, 3, 4),  # no divisor of 4 gives 8 outputs before all 4: the dense conv
    (6, 3, 3),  # 9 outputs from 3 groups: the smallest divisor that reaches 8
])
def test_regrouping_merges_the_fewest_groups_that_reach_8_outputs(groups, outs, merge):
    assert regroup_factor(groups, outs) == merge
    conv = BranchConv2d(4 * groups, outs * groups, 3, padding=1, groups=groups, bias=False, form='regrouped')
    x = torch.randn(1, 4 * groups, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), conv.forward_as(x, 'grouped'), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form', ['dense', 'regrouped'])
def test_merged_group_forms_script_trace_and_fx(form):
    """The forms of block-diagonal weights are plain ops: a PSA forced to one runs scripted, traced
    and as timm's FX graph as in eager, and trains through them (gradients reach the grouped weight)."""
    from timm.layers import get_graph_node_names
    from timm.models import create_feature_extractor
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(64, stride=2, branch_form=form)
    plain = PyramidSqueezeAttention(64, stride=2, branch_form='grouped')
    plain.load_state_dict(psa.state_dict())
    x = torch.randn(2, 64, 10, 10).contiguous(memory_format=torch.channels_last)
    last = get_graph_node_names(psa)[1][-1]
    fx = create_feature_extractor(psa, [last])
    assert any(n.op == 'call_module' and n.target == 'convs' for n in fx.graph.nodes)  # a leaf: runs the form
    expected = plain(x)
    grads = torch.autograd.grad(expected.square().sum(), plain.parameters())
    for how, model in (('script', torch.jit.script(psa)), ('trace', torch.jit.trace(psa, x)),
                       ('fx', lambda x_in: fx(x_in)[last])):
        y = model(x)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=how)
        for a, b in zip(torch.autograd.grad(y.square().sum(), psa.parameters()), grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=how)


@pytest.mark.parametrize('form', ['dense', 'regrouped'])
def test_inference_builds_merged_weights_once_until_the_weight_changes(form, monkeypatch):
    """In eval mode without autograd a merged-group form builds its block-diagonal weight once,
    not per forward (the build's small ops are host time a GPU step waits on), and builds it anew
    whenever the weight changes: in place (an optimizer step, load_state_dict), replaced, or cast,
    and at a mode switch after a write through `.data`, which no version records. Train mode
    builds it every forward: a momentum encoder's no-grad forwards follow `.data` updates."""
    from timm_epsanet import _branch_conv
    builds = []
    build = _branch_conv.block_diagonal_weight
    monkeypatch.setattr(_branch_conv, 'block_diagonal_weight', lambda *args: builds.append(1) or build(*args))
    conv = BranchConv2d(32, 16, 5, padding=2, groups=8, bias=False, form=form)
    x = torch.randn(2, 32, 6, 6)

    def expected():
        return F.conv2d(x, conv.weight, None, 1, 2, 1, 8)

    def check(built):
        before = len(builds)
        with torch.no_grad():
            y = conv(x)
        assert len(builds) - before == int(built)
        torch.testing.assert_close(y, expected(), rtol=1e-4, atol=1e-4)

    for _ in range(2):  # train mode: MoCo's key encoder, updated through .data between no-grad forwards
        check(built=True)
        conv.weight.data.mul_(0.5).add_(0.01)
    conv.eval()
    check(built=True)
    check(built=False)
    conv(x).square().sum().backward()  # autograd: built in the graph, the gradient reaches the weight
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    torch.optim.SGD(conv.parameters(), lr=1.0).step()
    check(built=True)
    with torch.no_grad():
        conv.weight.mul_(-1)
    check(built=True)
    conv.load_state_dict({'weight': torch.randn_like(conv.weight)})
    check(built=True)
    conv.weight.data = torch.randn_like(conv.weight)
    check(built=True)
    conv.weight.data.mul_(-1)  # unseen by the version counter: seen at the next mode switch
    conv.train().eval()
    check(built=True)
    conv.double()
    x = x.double()
    check(built=True)
    check(built=False)
    import copy
    assert copy.deepcopy(conv)._kept == {}  # derived state: never copied


@pytest.mark.parametrize('form', ['dense', 'regrouped'])
def test_training_builds_merged_weights_each_step_but_their_mask_once(form):
    """A training step builds a merged-group form's block-diagonal weight anew, but not the 0/1 mask
    it multiplies by (each op is host time on a GPU, where training runs the dense form), and that
    mask trains even when inference under `torch.inference_mode` built it first."""
    from torch.profiler import profile
    from timm_epsanet import _branch_conv
    _branch_conv._kept_block_mask.cache_clear()  # built below first, whatever ran before
    torch.manual_seed(0)
    conv = BranchConv2d(32, 16, 5, padding=2, groups=8, bias=False, form=form).eval()
    x = torch.randn(2, 32, 6, 6)
    with torch.inference_mode():
        conv(x)
    conv.train()
    for _ in range(2):
        conv.weight.grad = None
        with profile() as prof:
            conv(x).square().sum().backward()
        assert not [e for e in prof.events() if e.name == 'aten::eye']
        weight = conv.weight.detach().requires_grad_()
        F.conv2d(x, weight, None, 1, 2, 1, 8).square().sum().backward()
        torch.testing.assert_close(conv.weight.grad, weight.grad, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            conv.weight.sub_(0.1 * conv.weight.grad)


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


@pytest.mark.parametrize('where', ['branches', 'global'])
def test_a_forward_hook_keeps_the_branch_outputs_it_saw(where):
    """Inference reweights the branches' concat in place, unless a forward hook (on the branches, or
    on every module) may hold it: features saved by a hook stay the branches' outputs."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(32, kernel_sizes=(3, 5), groups=(1, 2)).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        expected = torch.cat([conv(x) for conv in psa.convs], dim=1)
        y = psa(x)
    seen = []

    def hook(module, args, out):
        if module is psa.convs:
            seen.append(out)

    handle = (psa.convs.register_forward_hook(hook) if where == 'branches'
              else nn.modules.module.register_module_forward_hook(hook))
    try:
        with torch.no_grad():
            torch.testing.assert_close(psa(x), y)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], expected)


@pytest.mark.parametrize('grad', [False, True])
def test_every_branch_runs_its_hooks_as_a_conv_does(grad):
    """Summaries and FLOP counters (torchinfo, our model cards' activations) hook each conv, and
    pruning sets a conv's weight in a pre-hook: every branch runs its pre-hook and forward hook
    once per PSA call, in inference and training plans, and its hook sees its own output."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(32, 48, kernel_sizes=(3, 5, 7), groups=(1, 2, 4))
    x = torch.randn(2, 32, 8, 8)
    calls = []
    for conv in psa.convs:
        conv.register_forward_pre_hook(lambda m, args: calls.append(('pre', m, None)))
        conv.register_forward_hook(lambda m, args, out: calls.append(('out', m, out.detach().clone())))
    with torch.set_grad_enabled(grad):
        psa(x)
    assert [(when, m) for when, m, _ in calls] == [(when, conv) for conv in psa.convs for when in ('pre', 'out')]
    for _, conv, out in calls[1::2]:
        expected = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('grad', [False, True])
def test_hooks_on_seweight_see_its_gates(grad):
    """PSA's SEWeight runs as a module, once per call on every scale's pooled features: a hook on
    it (to look at the attention, as the paper's figures do) sees the gates, before the softmax."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(32, 48, kernel_sizes=(3, 5, 7), groups=(1, 2, 4))
    x = torch.randn(2, 32, 8, 8)
    seen = []
    psa.se.register_forward_hook(lambda module, args, out: seen.append((args[0].detach(), out.detach())))
    with torch.set_grad_enabled(grad):
        psa(x)
    assert len(seen) == 1
    pooled, gates = seen[0]
    expected = psa.convs(x).mean((2, 3)).reshape(2 * 3, 16, 1, 1)  # scale by scale, as the branches
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gates, psa.se(expected, pooled=True).detach())
    torch.testing.assert_close(psa.se(x[:, :16]), psa.se(x[:, :16].mean((2, 3), keepdim=True), pooled=True))


def test_a_pruned_branch_trains_on_its_masked_weight():
    """`torch.nn.utils.prune` recomputes a conv's weight (weight_orig * weight_mask) in a forward
    pre-hook: each step computes with the current masked weight, and pruned weights stay zero."""
    from torch.nn.utils import prune
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(32, kernel_sizes=(3, 5), groups=(1, 2))
    branch = psa.convs[1]
    prune.l1_unstructured(branch, 'weight', amount=0.5)
    optimizer = torch.optim.SGD(psa.parameters(), lr=0.5)
    x = torch.randn(2, 32, 8, 8)
    for _ in range(3):
        optimizer.zero_grad()
        psa(x).square().mean().backward()
        optimizer.step()
    masked = branch.weight_orig * branch.weight_mask
    with torch.no_grad():
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                y = psa.convs(x)[:, 16:]
            torch.testing.assert_close(y, F.conv2d(x, masked, None, 1, 2, 1, 2), rtol=1e-4, atol=1e-4)
    assert (branch.weight == 0).sum() == branch.weight.numel() // 2


def test_a_branch_replaced_by_another_module_computes_itself():
    """Adapters replace a conv by their own module (peft's LoRA wraps it): a PSA whose branch is
    another module calls it as it is, and computes the same function in both grad modes."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(32, kernel_sizes=(3, 5, 7), groups=(1, 2, 4), out_chs=48)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        expected = psa(x)

    class Adapted(nn.Module):  # a conv and a zero-initialised low-rank update, as LoRA wraps one
        def __init__(self, base):
            super().__init__()
            self.base, self.update = base, nn.Conv2d(base.in_channels, base.out_channels, 1, bias=False)
            nn.init.zeros_(self.update.weight)

        def forward(self, x):
            return self.base(x) + self.update(x)

    psa.convs[1] = Adapted(psa.convs[1])
    with torch.no_grad():
        torch.testing.assert_close(psa(x), expected, rtol=1e-4, atol=1e-4)
    psa(x).square().mean().backward()
    assert psa.convs[1].update.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('mode', ['fp32', 'autocast', 'bf16'])
def test_branch_conv_in_every_compute_dtype_equals_the_grouped_conv(mode):
    """The 3x3 branch of EPSANet Large's stage 1 (its form depends on the compute dtype on CPU), in
    fp32, under bf16 autocast and with bf16 tensors: the grouped conv's result, in that dtype."""
    torch.manual_seed(0)
    conv = BranchConv2d(128, 32, 3, padding=1, groups=32, bias=False)
    x = torch.randn(2, 128, 10, 10)
    if mode == 'bf16':
        conv, x = conv.to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'autocast'):
        y = conv(x)
        expected = F.conv2d(x, conv.weight, None, 1, 1, 1, 32)
    assert y.dtype == (torch.float32 if mode == 'fp32' else torch.bfloat16)
    torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_an_older_triton_is_refused_by_name(monkeypatch):
    """The Triton kernels are checked with triton 3.6 and later: with an older one 'auto' keeps the
    branches on cuDNN even where a GPU is present, and a Triton branch_form stops at the kernels'
    entry with both versions, not with a failure inside Triton's compiler."""
    pytest.importorskip('triton')
    from timm_epsanet import _branch_plans, _triton_branch
    monkeypatch.setattr(_branch_plans, 'triton_version', lambda: (3, 4))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(_branch_plans, 'TRITON_IN_AUTO', True)
    assert not _branch_plans.triton_in_auto() and not _branch_plans.triton_attention_in_auto()
    with pytest.warns(UserWarning, match=r'TIMM_EPSANET_TRITON=1 is ignored: .* found triton 3\.4; PSA runs on cuDNN'):
        _branch_plans.warn_if_triton_ignored()
    monkeypatch.setattr(_branch_plans, 'TRITON_IN_AUTO', False)
    monkeypatch.setattr(_branch_plans, 'TRITON_ATTENTION_IN_AUTO', True)
    assert not _branch_plans.triton_attention_in_auto()
    with pytest.warns(UserWarning, match=r'TIMM_EPSANET_TRITON=attention is ignored: .* found triton 3\.4'):
        _branch_plans.warn_if_triton_ignored()
    conv = BranchConv2d(32, 16, 5, padding=2, groups=2, bias=False, form='triton_mma')
    assert conv.plan_for('cuda', False)[0] == 'triton_mma'  # asked for by name: the kernels' entry decides
    with pytest.raises(RuntimeError, match=r'need triton >= 3\.6, found triton 3\.4'):
        _triton_branch.branch_conv(torch.randn(1, 32, 8, 8), conv.weight, (1, 1), (2, 2), (1, 1), 2)
