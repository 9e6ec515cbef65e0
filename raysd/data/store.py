"""The feature store: the features of every clip of a catalog (a log-mel, :class:`~raysd.data.features.FeatureSpec`,
or a full-clip spectrum, :class:`~raysd.data.features.SpectrumSpec`), computed once per (catalog content, spec) and
cached on disk as a memory-mapped array. This module owns the cache's on-disk format, including the clean-up of
what a killed writer leaves behind."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from numpy.lib.format import open_memmap

from raysd.data.features import AnySpec, FailedClip, extract, resolve_device, spec_from_dict

log = logging.getLogger(__name__)


FEATURES_FILE = "features.npy"
STORE_VERSION = 2  # 2: features.npy (NumPy's format, its shape and dtype in its header)


class FeatureStore:
    """Features of every clip of a catalog under one spec, cached on disk as a memory-mapped float32 array.

    Layout of ``<cache_dir>/features/<catalog key>-<spec key>/``: ``features.npy`` (float32, one row per clip that
    decoded, in catalog order, written and read memory-mapped in NumPy's format, ``numpy.lib.format.open_memmap``),
    ``index.csv`` (file, offset, row) and ``meta.json`` (spec, keys, shape, failed clips). The folder is built under a temporary name and
    renamed when complete, so a folder with the final name is always a complete cache; a lock file
    keeps concurrent processes from extracting the same key twice. The temporary name carries the writer's
    process id and host (``.<key>.tmp-<pid>-<token>@<host>``): every open removes the temporaries whose
    writer is no longer running on this host (a build killed mid-write leaves gigabytes otherwise).
    """

    def __init__(self, path: Path, spec: AnySpec, features: np.ndarray, index: pd.DataFrame,
                 failed: list[FailedClip], meta: dict, extracted: bool):
        self.path = path
        self.spec = spec
        self.features = features
        self.index = index
        self.failed = failed
        self.meta = meta
        self.extracted = extracted  # True when this open computed the features (a cache miss)
        self._lookup = pd.MultiIndex.from_arrays([index["file"].astype(str), index["offset"].astype("int64")])

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, clips={len(self)}, shape={tuple(self.features.shape)}, "
                f"failed={len(self.failed)})")

    @property
    def key(self) -> str:
        return self.path.name

    @staticmethod
    def cache_key(catalog, spec: AnySpec) -> str:
        return f"{catalog.content_key()}-{spec.key()}"

    @classmethod
    def open(cls, catalog, spec: AnySpec, cache_dir: str | os.PathLike, device: str | torch.device | None = None,
             batch_size: int | None = None, workers: int | None = None) -> FeatureStore:
        """The store of (catalog, spec): read from the cache, or extracted (batched) and cached first."""
        root = Path(cache_dir).expanduser() / "features"
        root.mkdir(parents=True, exist_ok=True)
        remove_dead_writers(root)
        key = cls.cache_key(catalog, spec)
        final = root / key
        store = cls._load(final, spec)
        if store is not None:
            return store
        with FileLock(str(root / f".{key}.lock")):
            store = cls._load(final, spec)
            if store is not None:
                return store
            tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
            tmp.mkdir()
            try:
                cls._build(tmp, catalog, spec, resolve_device(device), batch_size, workers)
                if final.exists():  # a cache that failed validation
                    shutil.rmtree(final)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        store = cls._load(final, spec)
        if store is None:
            raise RuntimeError(f"feature cache {final} could not be read back after extraction")
        store.extracted = True
        return store

    @classmethod
    def _load(cls, path: Path, spec: AnySpec) -> FeatureStore | None:
        meta_path = path / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            shape = tuple(int(s) for s in meta["shape"])
            expect = spec.item_shape
            if meta.get("version") != STORE_VERSION or spec_from_dict(meta["spec"]) != spec or shape[1:] != expect:
                raise ValueError(f"meta.json describes another spec or version (shape {shape}, expected (N, *{expect}))")
            features = np.load(path / FEATURES_FILE, mmap_mode="r") if shape[0] else np.zeros(shape, np.float32)
            if features.shape != shape or features.dtype != np.float32:
                raise ValueError(f"{FEATURES_FILE} holds {features.dtype} {features.shape}, expected float32 {shape}")
            index = pd.read_csv(path / "index.csv", dtype={"file": str, "offset": "int64", "row": "int64"},
                                keep_default_na=False)
            if len(index) != shape[0]:
                raise ValueError(f"index.csv has {len(index)} rows, features {shape[0]}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"feature cache {path} is unusable ({e}); extracting again", RuntimeWarning, stacklevel=3)
            shutil.rmtree(path, ignore_errors=True)
            return None
        failed = [FailedClip(str(f), int(o), str(r)) for f, o, r in meta.get("failed", [])]
        return cls(path, spec, features, index, failed, meta, extracted=False)

    @staticmethod
    def _build(path: Path, catalog, spec: AnySpec, device: torch.device, batch_size: int | None,
               workers: int | None) -> None:
        table = catalog.table
        t0 = time.perf_counter()
        rows: list[int] = []
        failed: list[FailedClip] = []
        shape = (len(table), *spec.item_shape)
        out = open_memmap(path / FEATURES_FILE, mode="w+", dtype=np.float32, shape=shape) if len(table) else None
        for ok, feats in extract(table, spec, device=device, batch_size=batch_size, workers=workers, failed=failed):
            if out is not None:
                out[np.asarray(ok, dtype=np.int64)] = feats
            rows.extend(ok)
        if out is not None:
            out.flush()
            del out
        if failed and rows:  # keep the rows of the clips that decoded, in order
            full = np.load(path / FEATURES_FILE, mmap_mode="r")
            kept = open_memmap(path / f"kept-{FEATURES_FILE}", mode="w+", dtype=np.float32,
                               shape=(len(rows), *spec.item_shape))
            for i in range(0, len(rows), 256):
                kept[i:i + 256] = full[np.asarray(rows[i:i + 256], dtype=np.int64)]
            kept.flush()
            del kept, full
            os.replace(path / f"kept-{FEATURES_FILE}", path / FEATURES_FILE)
        if failed:
            shown = "\n".join(f"  {fc.file} @ {fc.offset}: {fc.reason}" for fc in failed[:10])
            more = f"\n  ... and {len(failed) - 10} more (see {path.name}/meta.json)" if len(failed) > 10 else ""
            warnings.warn(f"feature extraction skipped {len(failed)} of {len(table)} clips that could not be "
                          f"decoded:\n{shown}{more}", RuntimeWarning, stacklevel=4)
        index = pd.DataFrame({"file": table["file"].to_numpy()[rows].astype(str),
                              "offset": table["offset"].to_numpy()[rows].astype("int64"),
                              "row": np.arange(len(rows), dtype=np.int64)})
        index.to_csv(path / "index.csv", index=False)
        meta = {
            "version": STORE_VERSION, "catalog_key": catalog.content_key(), "spec_key": spec.key(),
            "spec": spec.to_dict(), "shape": [len(rows), *spec.item_shape], "dtype": "float32",
            "clips": len(table), "failed": [[fc.file, fc.offset, fc.reason] for fc in failed],
            "device": str(device), "seconds": round(time.perf_counter() - t0, 3),
            "root": str(getattr(catalog, "root", "")), "layout": str(getattr(catalog, "layout", "")),
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=1))

    def row_of(self, table: pd.DataFrame, missing: str = "raise") -> np.ndarray:
        """Feature rows of catalog rows (matched on file and offset).

        ``missing='raise'``: a clip absent from the store (it failed to decode, or belongs to another
        catalog) is an error naming it; ``missing='mark'``: its row is -1.
        """
        if missing not in ("raise", "mark"):
            raise ValueError(f"missing must be 'raise' or 'mark', got {missing!r}")
        q = pd.MultiIndex.from_arrays([table["file"].astype(str), table["offset"].astype("int64")])
        pos = self._lookup.get_indexer(q)
        rows = np.where(pos >= 0, self.index["row"].to_numpy()[np.maximum(pos, 0)], -1).astype(np.int64)
        if missing == "raise" and (rows < 0).any():
            bad = np.flatnonzero(rows < 0)
            failed = {(fc.file, fc.offset): fc.reason for fc in self.failed}
            first = table.iloc[bad[0]]
            why = failed.get((str(first["file"]), int(first["offset"])), "not in this store's catalog")
            raise KeyError(f"{len(bad)} clip(s) have no features in {self.path}; first: {first['file']} "
                           f"@ {int(first['offset'])} ({why})")
        return rows

    def get(self, table: pd.DataFrame) -> torch.Tensor:
        """Features of catalog rows as a float32 tensor (N, *spec.item_shape), in the table's order."""
        rows = self.row_of(table)
        if len(rows) == 0:
            return torch.zeros(0, *self.spec.item_shape)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows),) + self.features.shape[1:], np.float32)
        out[order] = self.features[rows[order]]
        return torch.from_numpy(out)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_WRITER_TMP = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?:@(?P<host>.+))?$")


def remove_dead_writers(root: Path) -> list[Path]:
    """Remove the temporary cache folders under ``root`` whose writer process is gone; returns them.

    A folder written by another host is left alone; one without a host in its name (written by an older
    raysd) is taken to be this host's."""
    host = socket.gethostname()
    removed = []
    for tmp in root.glob(".*.tmp-*"):
        m = _WRITER_TMP.match(tmp.name)
        if m is None or not tmp.is_dir() or (m["host"] or host) != host or pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        log.info("removed %d partial feature cache folder(s) left by a writer that is no longer running, e.g. %s",
                 len(removed), removed[0])
    return removed
