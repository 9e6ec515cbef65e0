"""Zenodo for ``raysd.data.download``: the records of each DCASE data set (with pinned checksums), the errors a
download raises, HTTP with back-off, and the progress display (one line per file, or tqdm bars on a terminal)."""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

USER_AGENT = "raysd-download/0.1 (+https://github.com/raysd)"


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    folder: str  # sub-folder of --dest that becomes the data root
    records: Mapping[str, str]  # part -> Zenodo record id
    preset: str | None = None  # search preset that reads this data set


DATASETS: dict[str, Dataset] = {
    "dcase20": Dataset("dcase20", "DCASE 2020 Task 2", "dcase2020",
                       {"dev": "3678171", "eval_train": "3727685", "eval_test": "3841772"}, "dcase20"),
    "dcase21": Dataset("dcase21", "DCASE 2021 Task 2", "dcase2021",
                       {"dev": "4562016", "eval_train": "4660992", "eval_test": "4884786"}, "dcase21"),
    "dcase22": Dataset("dcase22", "DCASE 2022 Task 2", "dcase2022",
                       {"dev": "6355122", "eval_train": "6462969", "eval_test": "6586456"}),
    "dcase23": Dataset("dcase23", "DCASE 2023 Task 2", "dcase2023",
                       {"dev": "7882613", "eval_train": "7830345", "eval_test": "7860847"}, "dcase23"),
    "dcase24": Dataset("dcase24", "DCASE 2024 Task 2", "dcase2024",
                       {"dev": "10902294", "eval_train": "11259435", "eval_test": "11363076"}),
}
PARTS: tuple[str, ...] = ("dev", "eval_train", "eval_test")

# DCASE 2020 archive checksums as published with the task (dev / eval_train / eval_test per machine type).
_MD5_2020 = {
    "fan": ("649bdfc06263ae7a838963f43b6641e6", "567798854130c8019df8b664c095ed1e", "1eb9356a768cadfd0f2e59a5c57e578b"),
    "pump": ("90e7091ef722b7238a7f1009365779cd", "4e33ae9c0db5cc88437675f5e317caee", "23a8f8f924be218c69df67fe07360348"),
    "slider": ("da24a757719f0d94d5aa2d646bbfdc86", "f84f186f4295fc23754abcdd1b0580a7", "0193c769073840332ce3aad84b1ccaa2"),
    "ToyCar": ("4dec75ca8d9f666aa9e4c1894a740501", "a5d4ccd498af70b04dd74b644b820006", "bea2bdd612f616be8f2b8eb087b32c7c"),
    "ToyConveyor": ("03b6aa1bfd09a39d53af0ba39f71fa91", "0e808ac0b761e9fb13d5e0c65caff00d", "ccfcc9847c7d3404d7ee9d6d9e0b2ba2"),
    "valve": ("34d2672f55bb041589ef79c10dc89934", "057cdd560caffb8305449541afd28c6d", "f69c551d2088691050d20cccca9d631c"),
}
PINNED_MD5: dict[str, dict[str, str]] = {
    "dcase20": {
        name: md5
        for mt, sums in _MD5_2020.items()
        for name, md5 in zip((f"dev_data_{mt}.zip", f"eval_data_train_{mt}.zip", f"eval_data_test_{mt}.zip"), sums)
    },
}


class DownloadError(RuntimeError):
    """A download or unpacking that failed; the message names the file and what to do."""


class ChecksumError(DownloadError):
    """A downloaded file whose MD5 differs from the expected one."""


class ArchiveError(DownloadError):
    """An archive that cannot be unpacked safely (corrupt, truncated, unexpected layout or hostile)."""


# ---------------------------------------------------------------------------------------------- HTTP
def request(url: str, headers: Mapping[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})


def retry_after(err: urllib.error.HTTPError, default: float) -> float:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return min(max(0.0, float(value)), 300.0) if value is not None else default
    except ValueError:
        return default


def fetch_json(url: str, timeout: float = 60.0, retries: int = 5, backoff: float = 2.0) -> Any:
    """GET ``url`` and parse JSON, retrying connection errors, 429 and 5xx with back-off."""
    for attempt in range(retries + 1):
        wait = min(backoff * 2**attempt, 60.0)
        try:
            with urllib.request.urlopen(request(url, {"Accept": "application/json"}), timeout=timeout) as resp:
                body = resp.read()
            return json.loads(body)
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                if attempt == retries:
                    raise DownloadError(f"{url}: HTTP {e.code} {e.reason} after {retries + 1} attempts") from e
                time.sleep(retry_after(e, wait))
                continue
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
        except json.JSONDecodeError as e:
            raise DownloadError(f"{url}: the answer is not JSON ({e}); is --base-url a Zenodo server?") from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if attempt == retries:
                raise DownloadError(f"{url}: {e} after {retries + 1} attempts") from e
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- progress
def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """One progress bar per file: tqdm on a terminal when installed, else a plain line every 10 %."""

    def __init__(self, stream: IO[str] | None = None, bars: bool | None = None):
        self.stream = stream or sys.stderr
        if bars is None:
            bars = bool(getattr(self.stream, "isatty", lambda: False)())
        self._tqdm = None
        if bars:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:
                self._tqdm = None
        self._lock = threading.Lock()
        self._slots: list[bool] = []

    def line(self, text: str) -> None:
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def bar(self, name: str, total: int | None, initial: int = 0):
        with self._lock:
            slot = next((i for i, busy in enumerate(self._slots) if not busy), len(self._slots))
            if slot == len(self._slots):
                self._slots.append(True)
            self._slots[slot] = True
        bar = _Bar(self, name, total, initial, slot)
        try:
            yield bar
        finally:
            bar.close()
            with self._lock:
                self._slots[slot] = False


class _Bar:
    def __init__(self, progress: Progress, name: str, total: int | None, initial: int, slot: int):
        self.p, self.name, self.total, self.done = progress, name, total, initial
        self.t0, self.start = time.monotonic(), initial
        self._next_step = (initial * 10 // total + 1) if total else 1
        self._tq = None
        if progress._tqdm is not None:
            self._tq = progress._tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True,
                                      unit_divisor=1024, position=slot, leave=True, file=progress.stream)
        elif initial:
            progress.line(f"[download] {name}: resuming at {format_bytes(initial)}"
                          + (f" of {format_bytes(total)}" if total else ""))

    def reset(self) -> None:
        """The server ignored the Range request: the file starts again from byte 0."""
        self.done, self.start, self.t0 = 0, 0, time.monotonic()
        self._next_step = 1
        if self._tq is not None:
            self._tq.reset(total=self.total)

    def update(self, n: int) -> None:
        self.done += n
        if self._tq is not None:
            self._tq.update(n)
            return
        if self.total and self.done * 10 // self.total >= self._next_step:
            self._next_step = self.done * 10 // self.total + 1
            rate = (self.done - self.start) / max(time.monotonic() - self.t0, 1e-6)
            self.p.line(f"[download] {self.name}: {100 * self.done // self.total:3d}% "
                        f"({format_bytes(self.done)} of {format_bytes(self.total)}, {format_bytes(rate)}/s)")

    def close(self) -> None:
        if self._tq is not None:
            self._tq.close()
