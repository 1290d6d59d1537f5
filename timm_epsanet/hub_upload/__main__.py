"""python -m timm_epsanet.hub_upload: EPSANet checkpoints to Hub-ready folders, optionally pushed.

Examples:
    # one variant, dry run (writes hub_out/epsanet50_small.in1k/)
    python -m timm_epsanet.hub_upload epsanet50_small=output/train/run/model_best.pth.tar --ema
    # several variants, official-script checkpoints, then push each repo in one commit
    python -m timm_epsanet.hub_upload epsanet50_small=s50.pth.tar epsanet101_small=s101.pth.tar --push

All folders are written and validated before any is moved into place, and all are in place
before anything is pushed: a failure writes no folder.
"""
import argparse
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import timm

from timm_epsanet.convert import CheckpointError
from timm_epsanet.hub import hub_id

from .export import ExportError, discard_folder, install_folder, prepare_folder, push, remove_stale_work_folders

PROG = 'python -m timm_epsanet.hub_upload'


def parse_args(argv=None):
    variants = timm.list_models('epsanet*')
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoints', nargs='+', metavar='VARIANT=CHECKPOINT',
                        help=f'variant ({", ".join(variants)}) and its checkpoint: official-script '
                             f'(.pth/.pth.tar), timm train.py (.pth.tar) or .safetensors')
    parser.add_argument('--ema', action='store_true',
                        help="use train.py's EMA weights (state_dict_ema); an error if the checkpoint has none")
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
        if not sep or variant not in variants or not path:
            parser.error(f'{item!r}: expected VARIANT=CHECKPOINT with VARIANT one of {", ".join(variants)}')
        jobs.append((variant, Path(path)))
    if len({v for v, _ in jobs}) != len(jobs):
        parser.error('each variant may be given once')
    if (args.top1 is None) != (args.top5 is None):
        parser.error('--top1 and --top5 go together')
    return args, jobs


@contextmanager
def _sigterm_exits():
    """SIGTERM raises SystemExit, so that temporary folders are removed on the way out."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    args, jobs = parse_args(argv)
    with _sigterm_exits():
        return _run(args, jobs)


def _run(args, jobs) -> int:
    try:
        remove_stale_work_folders(args.out)
    except OSError as e:
        print(f'error: cannot clean up {args.out}: {e.strerror or e}', file=sys.stderr)
        return 2
    exports = []
    try:
        try:
            for variant, path in jobs:  # every folder is written and validated before any is moved into place
                repo_id = f'{args.org}/{hub_id(variant).split("/")[-1]}' if args.org else hub_id(variant)
                exports.append(prepare_folder(variant, path, args.out, use_ema=args.ema, repo_id=repo_id,
                                              overwrite=args.overwrite, top1=args.top1, top5=args.top5))
        except (CheckpointError, ExportError) as e:
            print(f'error: {e} (nothing was written)', file=sys.stderr)
            return 2
        written = []
        for export in exports:
            try:
                written.append(install_folder(export))
            except ExportError as e:
                print(f'error: {e} (written: {", ".join(map(str, written)) or "none"}; not written: '
                      f'{", ".join(str(x.target) for x in exports[len(written):])})', file=sys.stderr)
                return 2
    finally:
        for export in exports:  # the temporary folders of those not moved into place
            discard_folder(export)
    for target in written:
        print(f'wrote {target}')
    if not args.push:
        print(f'dry run: {len(written)} folder(s) written under {args.out}; add --push to upload')
        return 0
    pushed = []
    for export in exports:
        try:
            push(export, private=args.private, revision=args.revision, create_pr=args.create_pr)
        except Exception as e:  # network, permissions, quota: say what is on the Hub now
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            print(f'error: pushing {export.repo_id} failed ({type(e).__name__}: {first}); pushed: '
                  f'{", ".join(pushed) or "none"}; not pushed: {", ".join(x.repo_id for x in exports[len(pushed):])}. '
                  f'The folders are under {args.out}; push again with --push --overwrite.', file=sys.stderr)
            return 2
        pushed.append(export.repo_id)
    return 0

if __name__ == '__main__':
    sys.exit(main())
