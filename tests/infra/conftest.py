"""Rendered manifest sets of the platform (``infra_checks.ALL_SETS``), built once per session; tests get deep copies,
so they may mutate them."""

from __future__ import annotations

import copy

import pytest
from infra_checks import render


@pytest.fixture(scope="session")
def _rendered_cache() -> dict[str, list[dict]]:
    return {}


@pytest.fixture
def rendered(_rendered_cache):
    """``rendered(name)``: the documents of one set, freshly copied."""

    def get(name: str) -> list[dict]:
        if name not in _rendered_cache:
            _rendered_cache[name] = render(name)
        return copy.deepcopy(_rendered_cache[name])

    return get
