"""Reading and writing small result files on local disk or on object storage (s3://, gs://).

Local writes are atomic (temporary name, then rename); object-store writes are atomic per object.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raysd.atomic import atomic_path


def is_remote(uri: str | os.PathLike) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def within(base: str, path: str | None) -> str | None:
    """A path that Ray gives inside ``base``'s file system (without its scheme) as a URI beside ``base``."""
    if path is None:
        return None
    if is_remote(base) and "://" not in path:
        return f"{str(base).split('://', 1)[0]}://{path}"
    return path


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base).joinpath(*parts))


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    uri = str(uri)
    if is_remote(uri):
        fs, path = _fs(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    with atomic_path(uri) as tmp:
        tmp.write_bytes(data)


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str | os.PathLike, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_bytes(uri: str | os.PathLike) -> bytes:
    uri = str(uri)
    if is_remote(uri):
        fs, path = _fs(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    return Path(uri).read_bytes()


def read_json(uri: str | os.PathLike) -> Any:
    return json.loads(read_bytes(uri))


def exists(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    if is_remote(uri):
        import pyarrow.fs

        fs, path = _fs(uri)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    return Path(uri).exists()


def list_files(uri: str | os.PathLike, suffix: str = "") -> list[str]:
    """Every file below ``uri`` (recursively) whose name ends with ``suffix``."""
    uri = str(uri)
    if is_remote(uri):
        import pyarrow.fs

        fs, path = _fs(uri)
        scheme = uri.split("://", 1)[0]
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
        return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pyarrow.fs.FileType.File and i.path.endswith(suffix))
    root = Path(uri)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob(f"*{suffix}") if p.is_file())
