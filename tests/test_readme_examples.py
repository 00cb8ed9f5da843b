"""Every ```python block of the README runs as written.

The blocks run in README order, each in a fresh namespace, in a fresh directory where the
README's first chain command (the tiny pretraining, shrunk as tests/test_chain.py shrinks it)
has written `runs/pretrain-tiny/ckpt-final`: the state a new user is in after that command. A
block that raises fails its test with the block's text and the traceback.
"""

from __future__ import annotations

import re
import traceback

import pytest

from conftest import ROOT
from test_chain import readme_chain, run


def python_blocks() -> list[str]:
    """The ```python blocks of the README, in order."""
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def after_first_command(tmp_path_factory):
    """A directory in which the README chain's first command (the pretraining) has run."""
    directory = tmp_path_factory.mktemp("readme")
    first = readme_chain()[0]
    assert first[:2] == ["python", "pretrain.py"], first
    proc = run(first, directory)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return directory


def test_the_readme_has_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2, blocks
    assert any("load_encoder(" in b and ".embed(" in b for b in blocks)


@pytest.mark.parametrize("number", range(1, len(python_blocks()) + 1))
def test_readme_python_block_runs(number, after_first_command, monkeypatch):
    block = python_blocks()[number - 1]
    for path in re.findall(r"[\"'](runs/[^\"']+)[\"']", block):  # what the block expects to exist
        assert (after_first_command / path).exists(), f"{path}, used by README block:\n{block}"
    monkeypatch.chdir(after_first_command)
    try:
        exec(compile(block, f"<README.md python block {number}>", "exec"), {"__name__": "__main__"})
    except Exception:
        pytest.fail(f"README python block {number} raised:\n\n{block}\n{traceback.format_exc()}",
                    pytrace=False)
