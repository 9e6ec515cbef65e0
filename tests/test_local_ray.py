"""raysd's local Ray instance starts through a stand-in ``ray start``: one that exits before its head is up is tried
again with fresh ports (below the range the OS numbers outgoing connections from), and one that never comes up
fails with the end of its log."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from raysd import local_ray

FAKE_RAY = """
import os, pathlib, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
count = pathlib.Path(os.environ["FAKE_COUNT"])
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
pathlib.Path(os.environ["FAKE_COUNT"] + f".{n}").write_text(" ".join(sys.argv[1:]))
if n < int(os.environ["FAKE_FAILS"]):
    print(f"boom {n}: address already in use", flush=True)
    sys.exit(1)
pathlib.Path(args["temp-dir"]).mkdir(parents=True, exist_ok=True)
pathlib.Path(args["temp-dir"], "ray_current_cluster").write_text("127.0.0.1:" + args["port"])
time.sleep(600)
"""


@pytest.fixture
def fake_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake_ray.py"
    script.write_text(FAKE_RAY)
    monkeypatch.setattr(local_ray, "ray_command", lambda: [sys.executable, str(script)])
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("FAKE_COUNT", str(tmp_path / "count"))
    (tmp_path / "tmp" / "ray").mkdir(parents=True)
    (tmp_path / "tmp" / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # a head that is gone
    (tmp_path / "state").mkdir()
    return tmp_path


def test_a_ray_start_that_exits_early_is_tried_again_with_fresh_distinct_ports(fake_ray: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAILS", "2")
    inst = local_ray.start(fake_ray / "state", num_cpus=2)
    try:
        assert (fake_ray / "count").read_text() == "3"
        assert local_ray.alive(inst.pid)
        ports = [[a.split("=")[1] for a in (fake_ray / f"count.{n}").read_text().split() if "port=" in a]
                 for n in range(3)]
        assert all(len(p) == 1 + len(local_ray.PORT_FLAGS) == len(set(p)) for p in ports)
        low, high = local_ray.PORT_RANGE
        assert all(low <= int(q) < high for p in ports for q in p)  # outside the OS's range for outgoing connections
        assert inst.address == f"127.0.0.1:{ports[2][0]}"
        assert "boom 1" in (fake_ray / "state" / "ray-start.log").read_text()
    finally:
        local_ray.stop(inst)
    assert not local_ray.alive(inst.pid)


def test_a_ray_start_that_never_comes_up_fails_naming_its_log_and_quoting_it(fake_ray: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAILS", "99")
    with pytest.raises(local_ray.LocalRayError, match=r"after 3 attempt\(s\)") as err:
        local_ray.start(fake_ray / "state", num_cpus=2)
    assert "boom 2: address already in use" in str(err.value) and "boom 1" not in str(err.value)
    assert str(fake_ray / "state" / "ray-start.log") in str(err.value)
