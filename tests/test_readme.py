"""Every ```python block of README.md runs as written (shell blocks are not run).

Each block runs on its own, in a fresh namespace and an empty working directory, after PRELUDE:
the names a snippet may use without defining them, as a reader would have them at hand.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'

# stand-ins for what a reader brings: `images`, a batch of two RGB images at 224x224
PRELUDE = """
import torch
images = torch.randn(2, 3, 224, 224)
"""

_BLOCK = re.compile(r'^```python[ \t]*\n(.*?)^```[ \t]*$', re.MULTILINE | re.DOTALL)


def python_blocks(text: str):
    """(line number, code) of each ```python block in a markdown text."""
    return [(text.count('\n', 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
    assert BLOCKS, f'no ```python blocks found in {README}'


@pytest.mark.parametrize('line, code', BLOCKS, ids=[f'README.md:{line}' for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files (e.g. a checkpoint)
    namespace = {'__name__': '__readme__'}
    exec(compile(PRELUDE, 'test_readme.PRELUDE', 'exec'), namespace)
    exec(compile(code, f'{README.name}, block at line {line}', 'exec'), namespace)


def test_python_blocks_finds_only_python():
    text = 'x\n```bash\npip install .\n```\n```python\na = 1\n```\n```python\nb = 2\nc = 3\n```\n'
    assert python_blocks(text) == [(5, 'a = 1\n'), (8, 'b = 2\nc = 3\n')]
