"""The house rules that code review alone would not keep: the import layers (import-linter's
contract in pyproject.toml) and each backbone's hub id named in one module only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from laps.models.backbones import BACKBONES, HUB_CONFIGS

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "laps"


def _lint_imports() -> str:
    here = Path(sys.executable).parent / "lint-imports"
    found = str(here) if here.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    return found


def test_layers_contract_is_kept() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([_lint_imports(), "--no-cache", "--config", str(REPO / "pyproject.toml")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_each_hub_id_is_named_in_one_module() -> None:
    ids = set(HUB_CONFIGS) | {spec.vision_id for spec in BACKBONES.values() if "/" in spec.vision_id}
    sources = {path: path.read_text() for path in SRC.rglob("*.py")}
    for hub_id in sorted(ids):
        holders = [str(path.relative_to(SRC)) for path, text in sources.items() if hub_id in text]
        assert len(holders) <= 1, (hub_id, holders)
