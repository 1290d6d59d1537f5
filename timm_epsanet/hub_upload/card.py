"""The model card (README.md) of an EPSANet Hub repo, as a timm model-card dict for `generate_readme`."""
from typing import Optional

from torch import nn

from timm_epsanet.complexity import count_activations, count_gmacs, count_params, meta_copy
from timm_epsanet.paper import TABLE2

TAGS = ['image-classification', 'timm', 'epsanet', 'pyramid-squeeze-attention']
PAPER = 'https://arxiv.org/abs/2105.14447'
PAPER_TITLE = 'EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network'
ORIGINAL_CODE = 'https://github.com/murufeng/EPSANet'
# What works today: the package is not on PyPI. Change this line once it is.
INSTALL = ('Install the `timm-epsanet` package (not on PyPI yet: `pip install .` in a clone of its repository); '
           'after that `import timm` knows the EPSANet models.')
CITATION = '''@inproceedings{zhang2022epsanet,
  title={EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network},
  author={Zhang, Hu and Zu, Keke and Lu, Jian and Zou, Yuru and Meng, Deyu},
  booktitle={Proceedings of the Asian Conference on Computer Vision (ACCV)},
  year={2022}
}'''

USAGE = '''{install}

### Image classification

```python
from urllib.request import urlopen
from PIL import Image
import timm
import torch

img = Image.open(urlopen("https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png"))
model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
transforms = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
with torch.inference_mode():
    top5_prob, top5_idx = model(transforms(img).unsqueeze(0)).softmax(dim=1).topk(5)
```

### Feature maps

```python
model = timm.create_model("hf-hub:{repo_id}", pretrained=True, features_only=True).eval()
feature_maps = model(transforms(img).unsqueeze(0))  # 5 maps, strides 2 to 32
```

### Image embeddings

```python
model = timm.create_model("hf-hub:{repo_id}", pretrained=True, num_classes=0).eval()
embedding = model(transforms(img).unsqueeze(0))  # (1, {num_features})
```
'''


def paper_name(variant: str) -> str:
    """'epsanet50_small' -> 'EPSANet(Small)-50', as the paper writes it."""
    depth, size = variant[len('epsanet'):].split('_')
    return f'EPSANet({size.capitalize()})-{depth}'


def model_card(
        variant: str,
        repo_id: str,
        model: nn.Module,
        source: str,
        source_format: str,
        used_ema: bool,
        max_abs_diff: float,
        top1: Optional[float] = None,
        top5: Optional[float] = None,
) -> dict:
    """timm's model-card dict (`push_to_hf_hub(model_card=...)`, `generate_readme`)."""
    meta = meta_copy(model)
    size = model.pretrained_cfg['input_size']
    paper_params, paper_flops, paper_top1, paper_top5 = TABLE2[variant]
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': f'`{variant}`',
        'Model Stats': {
            'Params (M)': f'{count_params(model) / 1e6:.2f}',
            'GMACs': f'{count_gmacs(meta, size):.2f}',
            'Activations (M)': f'{count_activations(meta, size):.2f}',
            'Image size': f'{size[1]} x {size[2]}',
        },
        'Papers': {PAPER_TITLE: PAPER},
        'Original': ORIGINAL_CODE,
        'Dataset': 'ImageNet-1k',
    }
    if top1 is not None and top5 is not None:
        details['ImageNet-1k val (measured on these weights)'] = f'top-1 {top1:.2f}%, top-5 {top5:.2f}%'
    notes = ''.join(f'\n> {n}\n' for n in model.pretrained_cfg.get('notes') or ())
    conversion = (
        'The official PSA branch convolutions were renamed (`conv2.conv_1..4` to `conv2.convs.0..3`) and the '
        'channels after PSA permuted (`bn2`, the input of `conv3`): the official code concatenates the PSA '
        'branches in reverse order, this implementation in the paper\'s order. '
        if source_format.startswith('official') else 'Its weights use this implementation\'s names and needed no conversion. ')
    description = (
        f'{paper_name(variant)} image classifier: a ResNet whose bottleneck 3x3 convolutions are replaced by '
        f'Pyramid Squeeze Attention (PSA), from [{PAPER_TITLE}]({PAPER}). Built with '
        f'[timm](https://github.com/huggingface/pytorch-image-models) and the timm-epsanet package.\n{notes}\n'
        f'Source of the weights: `{source}` ({source_format}{", EMA weights" if used_ema else ""}), loaded with '
        f'`weights_only=True`. {conversion}It was saved as `model.safetensors`, the folder was reloaded with timm '
        f'and its logits compared with the source\'s on a fixed input: largest absolute difference '
        f'{max_abs_diff:.1e}.'
    )
    comparison = (
        f'Reported by the paper (Table 2), not measured on these weights: {paper_params:.2f}M params, '
        f'{paper_flops:.2f} GFLOPs, ImageNet-1k top-1 {paper_top1:.2f}%, top-5 {paper_top5:.2f}%.\n')
    return {
        'tags': TAGS,
        'license': model.pretrained_cfg.get('license', 'apache-2.0'),
        'description': description,
        'details': details,
        'usage': USAGE.format(install=INSTALL, repo_id=repo_id, num_features=model.num_features),
        'comparison': comparison,
        'citation': CITATION,
    }
