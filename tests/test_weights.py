"""Weights on demand: ``auto`` fetched from a (local, file://) URL once into the cache, checked against
the pinned sha256; a wrong checksum refused naming the file; no published digest recorded, then
enforced. Public entries are pointed at random weights written in the public formats."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import pytest
import torch

from vid2vid import weights
from vid2vid.eval.feature_nets import load_feature_net, save_random_weights
from vid2vid.weights import PUBLIC, WeightsSource, cache_dir, resolve


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "vid2vid"


@pytest.fixture
def mirror(tmp_path):
    """A 'server' folder holding random I3D weights under the public file name, and its digest."""
    path = save_random_weights("i3d", tmp_path / "server" / "rgb_imagenet.pt")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def pin(monkeypatch, name: str, **changes) -> WeightsSource:
    source = dataclasses.replace(PUBLIC[name], **changes)
    monkeypatch.setitem(PUBLIC, name, source)
    return source


def test_auto_fetches_once_into_the_cache_then_loads(cache, mirror, monkeypatch, caplog):
    path, sha = mirror
    pin(monkeypatch, "i3d", url=path.as_uri(), sha256=sha)
    assert cache_dir() == cache
    with caplog.at_level(logging.INFO, logger="vid2vid.weights"):
        got = resolve("auto", "i3d", "eval.i3d_weights")
    assert got == cache / "rgb_imagenet.pt" and got.read_bytes() == path.read_bytes()
    assert "downloading rgb_imagenet.pt" in caplog.text
    path.unlink()  # the server is gone: the cached, verified copy is used
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vid2vid.weights"):
        assert resolve("auto", "i3d", "eval.i3d_weights") == got
    assert "downloading" not in caplog.text
    path.with_name(path.name + ".random-weights").rename(got.with_name(got.name + ".random-weights"))
    net = load_feature_net("i3d", got)  # weights_only=True load of what was fetched
    assert net.random_weights and sum(p.numel() for p in net.parameters()) == 12_697_264


def test_a_wrong_checksum_is_refused_naming_the_file(cache, mirror, monkeypatch):
    path, sha = mirror
    pin(monkeypatch, "i3d", url=path.as_uri(), sha256="0" * 64)
    with pytest.raises(ValueError, match=rf"rgb_imagenet\.pt downloaded from {path.as_uri()}: sha256 {sha} does "
                                         rf"not match the pinned sha256 0{{64}}; the download was deleted"):
        resolve("auto", "i3d", "eval.i3d_weights")
    assert not (cache / "rgb_imagenet.pt").exists() and not list(cache.glob("*.part"))
    # a cached file changed after its download is refused too
    pin(monkeypatch, "i3d", url=path.as_uri(), sha256=sha)
    cached = resolve("auto", "i3d", "eval.i3d_weights")
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match=r"rgb_imagenet\.pt \(cached\): sha256 .* does not match"):
        resolve("auto", "i3d", "eval.i3d_weights")


def test_a_published_prefix_is_checked(cache, tmp_path, monkeypatch):
    """torchvision publishes 8 hex digits of the sha256 in its file names (vgg19-dcbb9e9d.pth)."""
    blob = tmp_path / "vgg.pth"
    torch.save({"x": torch.zeros(1)}, blob)
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    pin(monkeypatch, "vgg19", url=blob.as_uri(), sha256_prefix=sha[:8])
    assert resolve("auto", "vgg19", "model.vgg_weights").read_bytes() == blob.read_bytes()
    (cache / "vgg19-dcbb9e9d.pth").unlink()
    pin(monkeypatch, "vgg19", url=blob.as_uri(), sha256_prefix="dcbb9e9d")  # the real prefix: not this file
    with pytest.raises(ValueError, match="vgg19-dcbb9e9d.pth downloaded from .*sha256 prefix dcbb9e9d"):
        resolve("auto", "vgg19", "model.vgg_weights")


def test_without_a_published_digest_the_first_download_is_recorded_and_enforced(cache, mirror, monkeypatch,
                                                                                  caplog):
    path, sha = mirror
    pin(monkeypatch, "i3d", url=path.as_uri())  # sha256=None: as for the real piergiaj file
    with caplog.at_level(logging.WARNING, logger="vid2vid.weights"):
        got = resolve("auto", "i3d", "eval.i3d_weights")
    assert f"no published sha256 for {path.as_uri()}; this download's is {sha}" in caplog.text
    assert f"eval.i3d_weights={path.as_uri()}#sha256={sha}" in caplog.text  # how to pin it
    assert got.with_name(got.name + ".sha256").read_text().split()[0] == sha
    got.write_bytes(b"replaced")
    with pytest.raises(ValueError, match=f"differs from {sha}, recorded at its first download"):
        resolve("auto", "i3d", "eval.i3d_weights")


def test_url_settings_need_a_checksum_and_paths_pass_through(cache, mirror, tmp_path):
    path, sha = mirror
    got = resolve(f"{path.as_uri()}#sha256={sha}", "i3d", "eval.i3d_weights")
    assert got.parent.parent == cache and got.read_bytes() == path.read_bytes()  # its own folder, not auto's
    with pytest.raises(ValueError, match=r"eval.i3d_weights=.*needs its checksum, as URL#sha256="):
        resolve(path.as_uri(), "i3d", "eval.i3d_weights")
    assert resolve(str(tmp_path / "x.pt"), "i3d", "eval.i3d_weights") == tmp_path / "x.pt"
    assert resolve(None, "i3d", "eval.i3d_weights") is None
    with pytest.raises(OSError, match=r"cannot download .*; give eval.i3d_weights=/path/to/rgb_imagenet.pt"):
        resolve(f"{(tmp_path / 'gone.pt').as_uri()}#sha256={'1' * 64}", "i3d", "eval.i3d_weights")


def test_public_entries_cite_real_urls_and_invent_no_digest():
    for name, source in PUBLIC.items():
        assert source.url.startswith("https://") and source.note, name
    assert PUBLIC["vgg19"].sha256_prefix == "dcbb9e9d" and PUBLIC["vgg19"].sha256 is None
    assert all(s.sha256 is None for s in PUBLIC.values()), "no publisher gives a full sha256 for these files"
    assert weights.parse_source("auto", "i3d", "eval.i3d_weights") is PUBLIC["i3d"]
