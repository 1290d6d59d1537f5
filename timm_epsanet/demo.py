"""Demo: build every EPSANet variant through timm, print their sizes, classify a generated image.

    python -m timm_epsanet.demo
"""
import timm
import torch
from PIL import Image, ImageDraw

from .complexity import count_gmacs, count_params
from .paper import TABLE2


def make_image(size: int = 256) -> Image.Image:
    """A synthetic picture (sky, sun, field), so the demo needs no download."""
    img = Image.new('RGB', (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        shade = int(255 * y / size)
        draw.line([(0, y), (size, y)], fill=(90, 140 + shade // 3, 255 - shade // 2))
    draw.rectangle([0, size * 2 // 3, size, size], fill=(60, 150, 50))
    draw.ellipse([size // 8, size // 8, size // 3, size // 3], fill=(255, 220, 40))
    return img


def main() -> None:
    torch.manual_seed(0)
    names = timm.list_models('epsanet*')
    print(f'timm {timm.__version__}, torch {torch.__version__}: {len(names)} EPSANet models registered\n')
    print(f'| {"model":<17}| params (M) | GMACs 224 | paper params | paper FLOPs | paper top-1 |')
    print(f'|{"-" * 18}|{"-" * 12}|{"-" * 11}|{"-" * 14}|{"-" * 13}|{"-" * 13}|')
    models = {}
    for name in sorted(names, key=lambda n: tuple(TABLE2).index(n)):
        models[name] = model = timm.create_model(name).eval()
        p, f, top1, _ = TABLE2[name]
        print(f'| {name:<17}| {count_params(model) / 1e6:10.2f} | {count_gmacs(model):9.2f} |'
              f' {p:12.2f} | {f:11.2f} | {top1:11.2f} |')

    name = 'epsanet50_small'
    model = models[name]
    data_cfg = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**data_cfg)
    x = transform(make_image()).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    info = timm.data.ImageNetInfo()
    print(f'\n{name} on a generated image {tuple(x.shape)}, preprocessing {data_cfg}:')
    print('(random weights: no EPSANet ImageNet weights are published yet, so these classes are arbitrary)')
    for p, idx in zip(*probs.topk(5)):
        print(f'  {p.item():.4f}  {idx.item():4d}  {info.index_to_description(idx.item())}')


if __name__ == '__main__':
    main()
