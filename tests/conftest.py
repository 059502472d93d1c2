"""Shared test fixtures: small, made in the test, no network, no reads outside the repository."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    """tests/fixtures: copies of reference files (e.g. the official FathomNet 2025 taxonomy table)."""
    return FIXTURES
