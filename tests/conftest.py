"""Shared fixtures: the tiny synthetic data set (generated once per session) and the real fixture clip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``<clone>/../shared`` (the project's shared folder beside the clone), else ``$RAYSD_SHARED``."""
    beside = Path(__file__).resolve().parents[2] / "shared"
    env = os.environ.get("RAYSD_SHARED")
    return Path(env) if env and not (beside / "fixtures").is_dir() else beside


FIXTURE_CLIP = shared_dir() / "fixtures" / "dcase2020" / "normal_id_00_00000000.wav"


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic DCASE 2020 data set (seed 0): 6 machine types x 2 IDs, 3 s clips. Read-only."""
    from raysd.data import synth

    return synth.generate(tmp_path_factory.mktemp("synth") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny23_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic set in the DCASE 2023 layout (seed 0): sections, domains, attributes. Read-only."""
    from raysd.data import synth

    return synth.generate(tmp_path_factory.mktemp("synth") / "tiny23", preset="tiny", seed=0, layout="dcase2023")


@pytest.fixture(scope="session")
def fixture_clip() -> Path:
    """The real DCASE 2020 clip in ``shared/fixtures`` (skips the test when the checkout lacks it)."""
    if not FIXTURE_CLIP.exists():
        pytest.skip(f"fixture clip {FIXTURE_CLIP} not present (set RAYSD_SHARED to the shared folder)")
    return FIXTURE_CLIP


@pytest.fixture
def one_thread():
    """One intra-op thread: the family models are small, and on a busy shared CPU two spinning OpenMP
    threads make a step 10-20x slower (measured), while one thread loses little on a quiet one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
