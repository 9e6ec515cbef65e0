"""raysd's local Ray instance: one per machine (and user), shared by every search that runs there at once.

A search with no cluster to attach to (no ``RAY_ADDRESS``, not under ``ray job submit``) joins raysd's local
instance, and starts it first when none is running: ``ray start --head --block`` as a process of its own, so the
instance outlives the search that started it. Each search that uses it registers itself; the last one to leave
stops it (SIGTERM to that ``ray start`` process, which shuts down the Ray processes it started, and nothing else).

Why one shared instance rather than one per search: Ray's own helpers (its state API, Ray Train's placement group
cleaner, the job supervisor) find "the" local instance by looking for its processes and fail when there are
several, and two instances would each hand out every core of the machine. Joined searches share the cores: Ray
queues the trials of both.

The instance is a ``ray start`` head like one a user starts by hand, in Ray's default temporary folder: a search
(and anything else on the machine) attaches to it with ``ray.init(address="auto")``, the documented way, which
also brings the instance's authentication token along. A head that a user started by hand is joined the same way,
and never stopped by raysd.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from raysd.atomic import atomic_write_text
from raysd.log import module_logger

log = module_logger(__name__, __spec__)
INSTANCE_FILE = "instance.json"
USERS_DIR = "users"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
PORT_FLAGS = ("dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port")  # free ones: another Ray's fixed defaults may be taken
FORWARDED_ENV = ("PYTHONPATH",)  # besides every RAYSD_* variable: what a search's Ray workers must see as it does


class LocalRayError(RuntimeError):
    """The local instance could not be started, with where its log is."""


@dataclass
class Instance:
    address: str  # the GCS address ray.init takes
    pid: int  # the `ray start --block` process, which owns the instance's processes
    temp_dir: str


def state_dir() -> Path:
    """Where the searches on this machine keep the instance's address and who uses it: beside Ray's own folder, so
    searches with different caches still find each other."""
    return ray_temp_dir().with_name(f"raysd-{os.getuid()}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read(folder: Path) -> Instance | None:
    try:
        inst = Instance(**json.loads((folder / INSTANCE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return inst if alive(inst.pid) else None


def _users(folder: Path) -> list[int]:
    """The searches registered on the instance that are still running."""
    live = []
    for f in (folder / USERS_DIR).glob("*"):
        pid = int(f.name) if f.name.isdigit() else -1
        if pid > 0 and alive(pid):
            live.append(pid)
        else:
            f.unlink(missing_ok=True)
    return live


def ray_command() -> list[str]:
    """The ``ray`` command line of the Ray that this Python imports."""
    beside = Path(sys.executable).parent / "ray"
    return [str(beside)] if beside.exists() else [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def ray_temp_dir() -> Path:
    """Ray's default temporary folder, where a head started with ``ray start`` leaves its address."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(base or "/tmp") / "ray"


def running_head() -> str | None:
    """The address of a ``ray start`` head running on this machine (Ray's address file, its port answering)."""
    try:
        address = (ray_temp_dir() / "ray_current_cluster").read_text().strip()
        port = int(address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return address
    except (OSError, ValueError, IndexError):
        return None


def start(folder: Path, num_cpus: int) -> Instance:
    """Start the instance with ``num_cpus`` logical CPUs; returns once drivers can connect."""
    temp = ray_temp_dir()
    address_file = temp / "ray_current_cluster"  # written by `ray start` once the head is up
    port = _free_port()
    log_path = folder / "ray-start.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYSD_") and k not in FORWARDED_ENV}
    cmd = [*ray_command(), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
           *(f"--{flag}={_free_port()}" for flag in PORT_FLAGS)]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (address_file.exists() and address_file.read_text().strip().endswith(f":{port}")):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(Instance("", proc.pid, str(temp)))
            raise LocalRayError(f"the local Ray instance did not start (`{' '.join(cmd)}`); its log: {log_path}")
        time.sleep(0.2)
    inst = Instance(address_file.read_text().strip(), proc.pid, str(temp))
    atomic_write_text(folder / INSTANCE_FILE, json.dumps(asdict(inst)))
    log.info(f"started a local Ray instance at {inst.address} ({num_cpus} CPUs; log {log_path})")
    return inst


def stop(inst: Instance) -> None:
    """SIGTERM to the ``ray start`` process (it stops what it started); its process group is killed if it lingers."""
    if not alive(inst.pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(inst.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while alive(inst.pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(inst.pid, os.WNOHANG)  # reap it when this process started it
        time.sleep(0.2)
    if alive(inst.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(inst.pid, signal.SIGKILL)  # its own session: only the processes it started


def worker_env() -> dict[str, str]:
    """The variables this search's Ray workers get (the instance may have been started by another search)."""
    return {k: v for k, v in os.environ.items() if k.startswith("RAYSD_") or k in FORWARDED_ENV}


@contextlib.contextmanager
def joined(num_cpus: int | None = None, folder: Path | None = None) -> Iterator[None]:
    """Make sure a local head runs for ``ray.init(address="auto")`` while this process uses it: raysd's own (started
    here when none runs) or one a user started. On leaving, stop raysd's own if no other search still uses it."""
    folder = folder or state_dir()
    (folder / USERS_DIR).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / "lock"))
    with lock:
        inst = _read(folder)
        if inst is not None:
            others = ", ".join(map(str, _users(folder))) or "none now"
            log.info(f"joining raysd's local Ray instance at {inst.address} (other searches on it: {others})")
        elif (address := running_head()) is not None:
            log.info(f"joining the Ray instance running on this machine at {address} (`ray start`)")
        else:
            inst = start(folder, num_cpus or os.cpu_count() or 1)
        (folder / USERS_DIR / str(os.getpid())).touch()
    try:
        yield
    finally:
        with lock:
            (folder / USERS_DIR / str(os.getpid())).unlink(missing_ok=True)
            if inst is not None and not _users(folder) and _read(folder) == inst:
                stop(inst)
                (folder / INSTANCE_FILE).unlink(missing_ok=True)
