"""Where raysd keeps things on the local disk."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO_ROOT / "constraints.txt"  # the tested dependency set (scripts/lock.sh)
SEARCH_SPACES = REPO_ROOT / "search_spaces"  # the presets


def default_cache_dir() -> Path:
    """Feature cache and synthetic data: ``$RAYSD_CACHE``, else ``~/.cache/raysd``."""
    return Path(os.environ.get("RAYSD_CACHE", Path.home() / ".cache" / "raysd")).expanduser()
