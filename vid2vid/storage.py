"""Where run folders and prepared shards live: a local folder or a pyarrow filesystem URI.

``data.out`` and ``train.run_dir`` may be a local path or a URI that ``pyarrow.fs`` understands
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///abs/path``). Ray Train (``storage_path``)
and Ray Data, and pyarrow's Parquet readers and writers, take such URIs themselves; this module is how
the rest of the platform reads, writes and lists files at a *location* (a path or a URI string), so
that no code builds a ``pathlib.Path`` from a URI (``Path("s3://b/k")`` silently becomes ``s3:/b/k``).

Two kinds of location:

- **local**: a plain path or a ``file://`` URI. Writes go through a temporary name and a rename, so a
  reader sees a whole file or none.
- **remote**: any other URI. An object store has no rename, but a PUT is atomic: an object is either
  absent or complete, so writes go straight to their name.

Some state is local by nature: the offline tracking journal needs ``flock(2)``, SQLite needs a local
file. :func:`local_dir` gives the local folder that stands for a location on this node.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit


class StorageError(ValueError):
    """A location cannot be used for what was asked (e.g. a remote URI where a local folder is needed)."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def is_local(location: str | os.PathLike) -> bool:
    """A plain path or a ``file://`` URI."""
    return not is_uri(location) or str(location).startswith("file://")


def is_remote(location: str | os.PathLike) -> bool:
    return not is_local(location)


def normalize(location: str | os.PathLike) -> str:
    """An absolute path for a plain path; a URI unchanged but for a trailing slash."""
    text = str(location)
    if is_uri(text):
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{rest.rstrip('/') or '/'}" if scheme == "file" else f"{scheme}://{rest.rstrip('/')}"
    return str(Path(text).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...``; for a URI the query (e.g. ``?endpoint_override=``) stays at the end."""
    text = str(location)
    if not is_uri(text):
        return str(Path(text, *parts))
    base, sep, query = text.partition("?")
    tail = "/".join(str(p).strip("/") for p in parts if str(p).strip("/"))
    joined = base.rstrip("/") + ("/" + tail if tail else "")
    return joined + (sep + query if sep else "")


def name(location: str | os.PathLike) -> str:
    """The last component (``runs/ray/x/checkpoint_1`` -> ``checkpoint_1``)."""
    return _path_part(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | os.PathLike) -> str:
    text = str(location)
    if not is_uri(text):
        return str(Path(text).parent)
    base, sep, query = text.partition("?")
    head = base.rstrip("/").rsplit("/", 1)[0]
    return head + (sep + query if sep else "")


def _path_part(location: str | os.PathLike) -> str:
    text = str(location)
    return urlsplit(text).path if is_uri(text) else text


# ------------------------------------------------------------------------------------------------
# pyarrow filesystems


# What pyarrow reads from the environment when it makes a filesystem: a filesystem made under other
# values (another endpoint or account, e.g. a second S3 endpoint in the same process) is not reused.
_FILESYSTEM_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
                   "GOOGLE_APPLICATION_CREDENTIALS")


def _filesystem_for(prefix: str):
    return _cached_filesystem(prefix, tuple(os.environ.get(k) for k in _FILESYSTEM_ENV))


@functools.lru_cache(maxsize=32)
def _cached_filesystem(prefix: str, _environment: tuple):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(prefix)[0]


def resolve(location: str | os.PathLike):
    """``(pyarrow filesystem, path in it)`` for a location. Filesystems are cached per bucket."""
    import pyarrow.fs as pafs

    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    if text.startswith("file://"):
        return pafs.LocalFileSystem(), pafs.FileSystem.from_uri(text)[1]
    parts = urlsplit(text)
    fs = _filesystem_for(f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else ""))
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def location_of(filesystem, path: str) -> str:
    """The location string of ``path`` in ``filesystem`` (e.g. a Ray Train checkpoint's)."""
    kind = getattr(filesystem, "type_name", "local")
    if kind == "local":
        return path
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(kind, kind)
    return f"{scheme}://{path.lstrip('/')}"


def _info(location):
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such file") from None


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def read_json(location: str | os.PathLike, missing: Exception | None = None) -> Any:
    """The JSON document at ``location``; ``missing`` (an error naming what the file is for) is raised
    instead of the bare FileNotFoundError when there is none."""
    try:
        return json.loads(read_text(location))
    except FileNotFoundError:
        if missing is None:
            raise
        raise missing from None


def makedirs(location: str | os.PathLike) -> None:
    """Create a folder (a no-op on object stores, which have none)."""
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file so that a reader never sees part of it (see the module docstring)."""
    fs, path = resolve(location)
    if is_remote(location):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = temp_name(path)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # a rename within one folder: atomic
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode())


def temp_name(path: str) -> str:
    """A hidden temporary sibling of ``path`` (``.name.tmp-xxxxxxxx``), for write-then-rename."""
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}" if head else f".{tail}.tmp-{uuid.uuid4().hex[:8]}"


def list_files(location: str | os.PathLike, suffix: str = "", recursive: bool = True) -> list[str]:
    """Locations of the files under a folder (none when it does not exist), sorted."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    base = str(location).partition("?")[0].rstrip("/")
    out = []
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name.endswith(suffix):
            rel = info.path[len(path):].lstrip("/")
            out.append(join(location, rel) if is_uri(base) else str(Path(path, rel)))
    return sorted(out)


def delete_file(location: str | os.PathLike) -> None:
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def upload(local_path: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy a local file to ``location``; returns the location."""
    write_bytes(location, Path(local_path).read_bytes())
    return str(location)


# ------------------------------------------------------------------------------------------------
# Local stand-ins


def local_path(location: str | os.PathLike, what: str) -> Path:
    """The local folder a local location names; a clear error for a remote one.

    ``what`` names the setting (``"train.run_dir for vid2vid sweep"``) in the message.
    """
    text = str(location)
    if is_remote(text):
        raise StorageError(f"{what} must be a local folder (or file://), got {text}: this needs a POSIX "
                           f"filesystem; on a cluster use a folder every node mounts (EFS/NFS)")
    return Path(resolve(text)[1])


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vid2vid"


def local_dir(location: str | os.PathLike) -> Path:
    """The local folder that stands for ``location`` on this node.

    For a local location, the folder itself. For a remote one, ``~/.cache/vid2vid/runs/<URI quoted>``
    (``$XDG_CACHE_HOME`` respected): where node-local state of that run folder lives, e.g. the offline
    tracking journal (``flock`` needs a local file) and sample videos before their upload.
    """
    if is_local(location):
        return Path(resolve(location)[1])
    return cache_root() / "runs" / quote(normalize(location), safe="")
