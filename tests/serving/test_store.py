"""DeltaStore: plain directories load in place; fsspec URLs (memory://, file://) are copied to a cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bitdelta.artifact import load_delta
from bitdelta.errors import BitDeltaError
from bitdelta.serving.store import DeltaNotFound, DeltaStore, check_name

fsspec = pytest.importorskip("fsspec")  # an optional extra (bitdelta[test])


@pytest.fixture
def memory_store(delta_dir):
    """delta_dir's two artifacts uploaded to fsspec's in-memory filesystem, one under a nested name."""
    fs = fsspec.filesystem("memory")
    root = f"/store-{id(delta_dir)}"
    for name, dst in (("shakespeare", "shakespeare"), ("gsm8k", "team/gsm8k")):
        for f in (delta_dir / name).iterdir():
            fs.pipe(f"{root}/{dst}/{f.name}", f.read_bytes())
    fs.pipe(f"{root}/not-a-delta/readme.txt", b"no config here")
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_url_store_fetches_a_loadable_copy_and_releases_it(memory_store, tmp_path):
    store = DeltaStore(memory_store, cache_dir=str(tmp_path / "cache"))
    assert store.remote and store.names() == ["shakespeare", "team/gsm8k"]
    assert store.exists("team/gsm8k") and not store.exists("not-a-delta")
    path = store.fetch("team/gsm8k")
    assert Path(path).parent == tmp_path / "cache"
    delta = load_delta(path)  # the copy is a complete artifact
    assert delta.modules
    store.release("team/gsm8k", path)
    assert not Path(path).exists()
    with pytest.raises(DeltaNotFound, match="no artifact memory://.*/nope/delta_config.json"):
        store.fetch("nope")


def test_two_fetches_of_one_name_do_not_collide(memory_store, tmp_path):
    store = DeltaStore(memory_store, cache_dir=str(tmp_path))
    a, b = store.fetch("shakespeare"), store.fetch("shakespeare")
    assert a != b and Path(a).is_dir() and Path(b).is_dir()
    store.release("shakespeare", a)
    assert Path(b).is_dir()


def test_file_url_and_plain_path(delta_dir, tmp_path):
    url = DeltaStore(delta_dir.as_uri(), cache_dir=str(tmp_path))
    assert url.remote and {"shakespeare", "gsm8k"} <= set(url.names())
    copy = url.fetch("gsm8k")
    assert Path(copy).parent == tmp_path and (Path(copy) / "delta_config.json").is_file()
    plain = DeltaStore(str(delta_dir))
    assert not plain.remote and plain.fetch("gsm8k") == str(delta_dir / "gsm8k")
    plain.release("gsm8k", str(delta_dir / "gsm8k"))  # in place: never deleted
    assert (delta_dir / "gsm8k" / "delta_config.json").is_file()


def test_own_cache_is_made_on_demand_and_removed_on_close(memory_store):
    store = DeltaStore(memory_store)
    assert store.cache is None  # listing alone creates nothing on disk
    path = Path(store.fetch("shakespeare"))
    assert path.is_dir()
    store.close()
    assert not path.exists()


@pytest.mark.parametrize("bad", ["", "../etc", "a/../b", ".hidden", "a//b", "a/", "x" * 129, "sp ace", "a/.git"])
def test_names_cannot_leave_the_store(bad):
    with pytest.raises(BitDeltaError, match="invalid model name"):
        check_name(bad)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(BitDeltaError, match="is not a directory"):
        DeltaStore(str(tmp_path / "absent"))


def test_partial_copy_leaves_nothing(memory_store, tmp_path, monkeypatch):
    store = DeltaStore(memory_store, cache_dir=str(tmp_path))

    def broken(*a, **k):
        raise OSError("connection reset")

    monkeypatch.setattr(shutil, "copyfileobj", broken)
    with pytest.raises(OSError, match="connection reset"):
        store.fetch("shakespeare")
    assert list(tmp_path.iterdir()) == []
