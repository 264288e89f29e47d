"""Shared fixtures: a small real corpus prepared by the real pipeline, and recipe writers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SMALL, merge, write_recipe


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real prepared dataset (120 stdlib files, 1k-token BPE, 64-token blocks), made once per session."""
    from jobs.data.pipeline import prepare_data
    from jobs.recipe import parse_recipe

    out = tmp_path_factory.mktemp("small-data") / "data"
    recipe = parse_recipe(merge(SMALL, {"data": {"output_dir": str(out)}}))
    prepare_data(recipe)
    return out


@pytest.fixture
def make_recipe(tmp_path: Path, small_data: Path) -> Callable[..., Path]:
    """Write a SMALL-based recipe whose run and checkpoints live under tmp_path."""

    def make(name: str = "small", **sections: Any) -> Path:
        run = tmp_path / name
        data = merge(SMALL, {"name": name, "run_dir": str(run), "data": {"output_dir": str(small_data)},
                             "checkpoint": {"directory": str(run / "checkpoints")}})
        return write_recipe(tmp_path / f"{name}.yaml", merge(data, sections))

    return make
