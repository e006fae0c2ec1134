"""The README as a new user reads it: its Python block runs as written, and its commands work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str, section: str) -> list[str]:
    """The fenced ``language`` blocks of the README section titled ``section``."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def test_the_python_api_block_runs_as_written(tmp_path):
    (block,) = _blocks("python", "Python API")
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "mann.keras").is_file() and (tmp_path / "out" / "model.tflite").is_file()
    assert "vs dense" in result.stdout  # the convert table it prints


def test_the_legacy_commands_run_as_written(tmp_path):
    """The README's "A legacy model, end to end" commands, from a directory laid out like the repository."""
    (block,) = [b for b in _blocks("bash", "Command line") if "mann-edge convert tests/" in b]
    shutil.copytree(ROOT / "tests" / "fixtures", tmp_path / "tests" / "fixtures")
    executable = Path(sys.executable).with_name("mann-edge")
    if not executable.exists():
        pytest.skip(f"the mann-edge command is not installed beside {sys.executable}")
    for line in block.strip().splitlines():
        command = line.split()
        assert command[0] == "mann-edge"
        result = subprocess.run([str(executable), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"


def test_the_layer_table_is_the_one_the_tables_make():
    from mann_edge import coverage

    body = README.split(coverage.README_START, 1)[1].split(coverage.README_END, 1)[0]
    assert body.strip() == coverage.layer_table().strip(), \
        "the README's layer table is stale: run `python -m mann_edge.coverage --write README.md`"

