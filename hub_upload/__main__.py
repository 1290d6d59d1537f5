"""python -m hub_upload: EPSANet checkpoints to Hub-ready folders, optionally pushed.

Examples:
    # one variant, dry run (writes hub_out/epsanet50_small.in1k/)
    python -m hub_upload epsanet50_small=output/train/run/model_best.pth.tar --ema
    # all four, official-script checkpoints, then push each repo in one commit
    python -m hub_upload epsanet50_small=s50.pth.tar epsanet101_small=s101.pth.tar \\
        epsanet50_large=l50.pth.tar epsanet101_large=l101.pth.tar --push
"""
import argparse
import sys
from pathlib import Path

from timm_epsanet.convert import CheckpointError
from timm_epsanet.hub import hub_id

from .export import export_folder, push_folder

VARIANTS = ('epsanet50_small', 'epsanet50_large', 'epsanet101_small', 'epsanet101_large')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m hub_upload', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoints', nargs='+', metavar='VARIANT=CHECKPOINT',
                        help=f'variant ({", ".join(VARIANTS)}) and its checkpoint: official-script '
                             f'(.pth/.pth.tar), timm train.py (.pth.tar) or .safetensors')
    parser.add_argument('--ema', action='store_true', help="use train.py's EMA weights (state_dict_ema)")
    parser.add_argument('--out', type=Path, default=Path('hub_out'), help='where the repo folders go')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output folders')
    parser.add_argument('--org', help='Hub organisation (default: the package default, see timm_epsanet/hub.py)')
    parser.add_argument('--top1', type=float, help='ImageNet-1k top-1 YOU measured on these weights (for the card)')
    parser.add_argument('--top5', type=float, help='ImageNet-1k top-5 you measured on these weights')
    parser.add_argument('--push', action='store_true', help='upload (default: dry run, folders only)')
    parser.add_argument('--private', action='store_true', help='create the repos private')
    parser.add_argument('--revision', help='branch to push to (created if needed)')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    args = parser.parse_args(argv)
    jobs = []
    for item in args.checkpoints:
        variant, sep, path = item.partition('=')
        if not sep or variant not in VARIANTS:
            parser.error(f'{item!r}: expected VARIANT=CHECKPOINT with VARIANT one of {", ".join(VARIANTS)}')
        jobs.append((variant, Path(path)))
    if (args.top1 is None) != (args.top5 is None):
        parser.error('--top1 and --top5 go together')
    return args, jobs


def main(argv=None) -> int:
    args, jobs = parse_args(argv)
    folders = []
    try:
        for variant, path in jobs:  # every folder is written and validated before anything is pushed
            repo_id = f'{args.org}/{hub_id(variant).split("/")[-1]}' if args.org else hub_id(variant)
            folder = export_folder(variant, path, args.out, use_ema=args.ema, repo_id=repo_id,
                                   overwrite=args.overwrite, top1=args.top1, top5=args.top5)
            folders.append((folder, repo_id))
    except (CheckpointError, FileExistsError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if not args.push:
        print(f'dry run: {len(folders)} folder(s) written under {args.out}; add --push to upload')
        return 0
    for folder, repo_id in folders:
        push_folder(folder, repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
