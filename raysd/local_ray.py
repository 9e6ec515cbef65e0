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
import random
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
START_ATTEMPTS = 3
PORT_RANGE = (20000, 32768)  # the instance's own servers: see _free_port
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


def _ephemeral_low() -> int:
    """The lowest port the OS hands out to outgoing connections (Linux's setting; 32768 elsewhere, below BSD's)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port(rng: random.Random) -> int:
    """A port free on every address, between Ray's worker ports (10002-19999 by default) and the OS's ephemeral
    range: the Ray processes starting up open hundreds of outgoing connections, which the OS numbers from the
    ephemeral range, so a port chosen there may be taken by one of them before Ray's server binds it."""
    low, high = PORT_RANGE[0], min(PORT_RANGE[1], _ephemeral_low())
    for _ in range(200):
        port = rng.randrange(low, high) if high > low else 0
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise LocalRayError(f"no free port between {low} and {high} for the local Ray instance")


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
    """Start the instance with ``num_cpus`` logical CPUs; returns once drivers can connect.

    A ``ray start`` that exits before its head is up (a port taken between choosing it and binding it, a helper
    that did not come up on a loaded machine) is tried again with fresh ports, up to ``START_ATTEMPTS`` times; the
    error names the command and quotes the end of its log."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_once(folder, num_cpus)
        except _StartFailed as e:
            if attempt == START_ATTEMPTS or e.timed_out:
                raise LocalRayError(f"the local Ray instance did not start after {attempt} attempt(s) "
                                    f"(`{' '.join(e.cmd)}`); the end of its log ({e.log_path}):\n{e.tail}") from None
            log.warning(f"the local Ray instance did not start (attempt {attempt} of {START_ATTEMPTS}); trying again "
                        f"with other ports. The end of its log ({e.log_path}):\n{e.tail}")
    raise AssertionError("unreachable")


class _StartFailed(Exception):
    def __init__(self, cmd: list[str], log_path: Path, tail: str, timed_out: bool) -> None:
        super().__init__(tail)
        self.cmd, self.log_path, self.tail, self.timed_out = cmd, log_path, tail, timed_out


def _log_tail(log_path: Path, offset: int, lines: int = 15) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(unreadable: {e})"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"


def _start_once(folder: Path, num_cpus: int) -> Instance:
    temp = ray_temp_dir()
    address_file = temp / "ray_current_cluster"  # written by `ray start` once the head is up
    rng = random.Random()
    port = _free_port(rng)
    log_path = folder / "ray-start.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYSD_") and k not in FORWARDED_ENV}
    ports = {port}
    while len(ports) < 1 + len(PORT_FLAGS):  # distinct: the OS may hand back a port it just gave out
        ports.add(_free_port(rng))
    cmd = [*ray_command(), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
           *(f"--{flag}={p}" for flag, p in zip(PORT_FLAGS, sorted(ports - {port}), strict=True))]
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (address_file.exists() and address_file.read_text().strip().endswith(f":{port}")):
        exited, timed_out = proc.poll() is not None, time.monotonic() > deadline
        if exited or timed_out:
            stop(Instance("", proc.pid, str(temp)))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap it
            raise _StartFailed(cmd, log_path, _log_tail(log_path, offset), timed_out and not exited)
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
