"""The model card (README.md) of an EPSANet Hub repo."""
import copy
from typing import Optional

import torch
from torch import nn

from timm_epsanet.complexity import count_gmacs, count_params
from timm_epsanet.paper import TABLE2

CITATION = '''@inproceedings{zhang2022epsanet,
  title={EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network},
  author={Zhang, Hu and Zu, Keke and Lu, Jian and Zou, Yuru and Meng, Deyu},
  booktitle={Proceedings of the Asian Conference on Computer Vision (ACCV)},
  year={2022}
}'''


def paper_name(variant: str) -> str:
    """'epsanet50_small' -> 'EPSANet(Small)-50', as the paper writes it."""
    depth, size = variant[len('epsanet'):].split('_')
    return f'EPSANet({size.capitalize()})-{depth}'


def count_activations(model: nn.Module, input_size=(3, 224, 224)) -> float:
    """Output elements of every conv and linear layer for one image, in M (timm's 'activations')."""
    meta = model if next(model.parameters()).is_meta else copy.deepcopy(model).to('meta')
    total = [0]
    hooks = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + o.numel()))
             for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        meta.eval()(torch.empty(1, *input_size, device='meta'))
    for h in hooks:
        h.remove()
    return total[0] / 1e6


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
) -> str:
    meta = copy.deepcopy(model).to('meta')
    size = model.pretrained_cfg['input_size']
    params, gmacs, acts = count_params(model) / 1e6, count_gmacs(meta, size), count_activations(meta, size)
    paper_params, paper_flops, paper_top1, paper_top5 = TABLE2[variant]
    measured = (f'| ImageNet-1k val top-1 / top-5 (measured on these weights) | {top1:.2f} / {top5:.2f} |\n'
                if top1 is not None and top5 is not None else '')
    notes = ''.join(f'\n> {n}\n' for n in model.pretrained_cfg.get('notes') or ())
    conversion = (
        'The official PSA branch convolutions were renamed (`conv2.conv_1..4` to `conv2.convs.0..3`) and the '
        'channels after PSA permuted (`bn2`, the input of `conv3`): the official code concatenates the PSA '
        'branches in reverse order, this implementation in the paper\'s order. '
        if source_format.startswith('official') else 'Its weights use this implementation\'s names and needed no conversion. ')
    return f'''---
tags:
- image-classification
- timm
- epsanet
- pyramid-squeeze-attention
library_name: timm
pipeline_tag: image-classification
license: apache-2.0
datasets:
- imagenet-1k
---

# Model card for {repo_id}

{paper_name(variant)} image classifier: a ResNet whose bottleneck 3x3
convolutions are replaced by Pyramid Squeeze Attention (PSA), from
[EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network](https://arxiv.org/abs/2105.14447).
Built with [timm](https://github.com/huggingface/pytorch-image-models) and
[timm-epsanet](https://pypi.org/project/timm-epsanet/).
{notes}
## Model details

| | |
|---|---|
| Model type | image classification / feature backbone |
| Architecture | `{variant}` |
| Params (M) | {params:.2f} |
| GMACs | {gmacs:.2f} |
| Activations (M) | {acts:.2f} |
| Image size | {size[1]} x {size[2]} |
| Paper | [arXiv:2105.14447](https://arxiv.org/abs/2105.14447) |
| Original code | [murufeng/EPSANet](https://github.com/murufeng/EPSANet) |
| Dataset | ImageNet-1k |
{measured}
Reported by the paper (Table 2), not measured on these weights: {paper_params:.2f}M params,
{paper_flops:.2f} GFLOPs, ImageNet-1k top-1 {paper_top1:.2f}%, top-5 {paper_top5:.2f}%.

## Usage

`pip install timm-epsanet` once; after that `import timm` knows the EPSANet models.

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
embedding = model(transforms(img).unsqueeze(0))  # (1, {model.num_features})
```

## How the weights were converted

Source: `{source}` ({source_format}{', EMA weights' if used_ema else ''}), loaded with
`weights_only=True`. {conversion}It was saved as `model.safetensors`, the folder was reloaded
with timm and its logits compared with the source's on a fixed input: largest absolute
difference {max_abs_diff:.1e}.

## Citation

```bibtex
{CITATION}
```
'''
