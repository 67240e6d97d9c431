"""An artifact never reaches outside its own directory: listed files, weights, shards and links.

Loading, ``merge`` (the files it writes next to the merged model), ``inspect`` and serving
registration all refuse names with directory parts and links that resolve elsewhere.
"""

import json
import os
import shutil

import pytest
import torch

import bitdelta
from bitdelta import artifact
from bitdelta.cli import main
from bitdelta.errors import FormatError
from bitdelta.hf import save_model_atomic
from bitdelta.report import describe_artifact
from models import load, make_pair

SECRET = b"outside-the-artifact: this must never be read\n"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("paths-pair"))


@pytest.fixture(scope="module")
def pristine(pair, tmp_path_factory):
    base_dir, ft_dir = pair
    delta = bitdelta.compress(base_dir, ft_dir, scale="row", progress=False)
    delta.files["tokenizer_config.json"] = b'{"model_max_length": 64}'
    out = tmp_path_factory.mktemp("paths-pristine") / "ft.bitdelta"
    delta.save_pretrained(out)
    return out


@pytest.fixture()
def art(pristine, tmp_path):
    """A fresh copy of the artifact under tmp/deltas, and a secret file outside it (tmp/secret.txt)."""
    out = tmp_path / "deltas" / "ft"
    shutil.copytree(pristine, out)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return out


def _edit_config(path, **changes):
    cfg = json.loads((path / "delta_config.json").read_text())
    cfg.update(changes)
    (path / "delta_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "../secret.txt", "/etc/passwd", "sub/file.json", "..", ""])
def test_listed_file_names_must_be_plain(art, entry):
    _edit_config(art, files=["tokenizer_config.json", entry])
    with pytest.raises(FormatError, match="files") as e:
        bitdelta.Delta.from_pretrained(art)
    assert repr(entry) in str(e.value) or "non-empty" in str(e.value)
    with pytest.raises(FormatError):
        describe_artifact(art)


def test_listed_file_linking_outside_is_refused(art, tmp_path):
    (art / "tokenizer_config.json").unlink()
    (art / "tokenizer_config.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(FormatError, match="outside"):
        bitdelta.Delta.from_pretrained(art)
    with pytest.raises(FormatError, match="outside"):
        describe_artifact(art)


def test_link_inside_the_artifact_is_fine(art):
    data = (art / "tokenizer_config.json").read_bytes()
    (art / "real_tokenizer_config.json").write_bytes(data)
    (art / "tokenizer_config.json").unlink()
    (art / "tokenizer_config.json").symlink_to("real_tokenizer_config.json")
    delta = bitdelta.Delta.from_pretrained(art)
    assert delta.files["tokenizer_config.json"] == data
    assert "tokenizer_config.json" in describe_artifact(art)["files"]


def test_unlisted_link_outside_is_refused(art, tmp_path):
    # tokenizer loading reads the directory, listed or not: no entry may lead out of it
    (art / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(FormatError, match="tokenizer.json"):
        bitdelta.Delta.from_pretrained(art)


def test_weights_file_linking_outside_is_refused(art, tmp_path):
    shutil.move(art / "delta.safetensors", tmp_path / "elsewhere.safetensors")
    (art / "delta.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FormatError, match="outside"):
        bitdelta.Delta.from_pretrained(art)


def test_shards_and_index_stay_inside(pristine, tmp_path):
    delta = bitdelta.Delta.from_pretrained(pristine)
    out = tmp_path / "deltas" / "sharded"
    delta.save_pretrained(out, max_shard_size=3000)
    shards = sorted(out.glob("delta-*.safetensors"))
    assert len(shards) > 2
    assert bitdelta.Delta.from_pretrained(out).modules.keys() == delta.modules.keys()

    index = out / "delta.safetensors.index.json"
    original = index.read_text()
    # a shard named with a directory part, even one that exists
    shutil.copy(shards[0], tmp_path / "deltas" / shards[0].name)
    data = json.loads(original)
    data["weight_map"] = {k: ("../" + v if v == shards[0].name else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(FormatError, match="plain file name"):
        bitdelta.Delta.from_pretrained(out)
    # a shard that is a link out of the artifact
    index.write_text(original)
    shutil.move(shards[1], tmp_path / "moved.safetensors")
    shards[1].symlink_to(tmp_path / "moved.safetensors")
    with pytest.raises(FormatError, match="outside"):
        bitdelta.Delta.from_pretrained(out)
    # the index itself as a link out
    shards[1].unlink()
    shutil.move(tmp_path / "moved.safetensors", shards[1])
    shutil.move(index, tmp_path / "index.json")
    index.symlink_to(tmp_path / "index.json")
    with pytest.raises(FormatError, match="outside"):
        bitdelta.Delta.from_pretrained(out)


def test_config_linking_outside_is_refused(art, tmp_path):
    shutil.move(art / "delta_config.json", tmp_path / "cfg.json")
    (art / "delta_config.json").symlink_to(tmp_path / "cfg.json")
    with pytest.raises(FormatError, match="outside"):
        bitdelta.Delta.from_pretrained(art)
    with pytest.raises(FormatError, match="outside"):
        describe_artifact(art)


def test_root_confines_the_artifact_directory(art, tmp_path):
    root = tmp_path / "deltas"
    assert bitdelta.Delta.from_pretrained(art).modules  # fine without a root
    artifact.load_delta(art, root=root)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(art, elsewhere)
    (root / "ft").symlink_to(elsewhere, target_is_directory=True)  # inside root by name only
    artifact.load_delta(root / "ft")
    with pytest.raises(FormatError, match="outside"):
        artifact.load_delta(root / "ft", root=root)
    with pytest.raises(FormatError, match="not an artifact directory"):  # never a hub download under a root
        artifact.load_delta("someone/not-a-dir", root=root)


def test_hub_cache_snapshot_links_into_its_blobs(pristine, tmp_path):
    repo = tmp_path / "models--someone--ft"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(pristine.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    delta = bitdelta.Delta.from_pretrained(snap)
    assert delta.files["tokenizer_config.json"] == (pristine / "tokenizer_config.json").read_bytes()
    # but nothing outside the repository folder
    (snap / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    with pytest.raises(FormatError, match="outside"):
        bitdelta.Delta.from_pretrained(snap)


def test_save_refuses_file_names_with_directories(pristine, tmp_path):
    delta = bitdelta.Delta.from_pretrained(pristine)
    delta.files["../payload.txt"] = b"x"
    with pytest.raises(FormatError, match="payload"):
        delta.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "payload.txt").exists()


def test_save_model_atomic_writes_only_plain_names(pair, tmp_path):
    model = load(pair[0])
    for bad in ("../payload.txt", "/tmp/payload.txt", "a/b.txt", ".."):
        with pytest.raises(FormatError, match="plain file name"):
            save_model_atomic(model, {"tokenizer.json": b"{}", bad: b"payload"}, tmp_path / "merged" / "out")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
    assert not (tmp_path / "payload.txt").exists() and not (tmp_path / "merged" / "payload.txt").exists()


def test_merge_cli_refuses_escaping_entries(art, pair, tmp_path, capsys):
    (tmp_path / "deltas" / "payload.txt").write_text("payload")
    _edit_config(art, files=["tokenizer_config.json", "../payload.txt"])
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(pair[0]), "--delta", str(art), "--out", str(out)]) != 0
    assert "../payload.txt" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "payload.txt").exists()


def test_inspect_cli_reports_bad_entries_without_a_traceback(art, tmp_path, capsys):
    (art / "README.md").unlink()
    (art / "README.md").symlink_to(tmp_path / "secret.txt")
    assert main(["inspect", str(art)]) != 0
    err = capsys.readouterr().err
    assert "outside" in err and "Traceback" not in err


def test_registration_obeys_root(art, pair, tmp_path):
    from bitdelta.serving.model import DeltaLlama
    from bitdelta.serving.slots import DeltaSlots

    slots = DeltaSlots(DeltaLlama.from_hf(load(pair[0])), max_gpu_deltas=1)
    slots.register("ok", art, root=tmp_path / "deltas")
    assert slots.get("ok").root == str(tmp_path / "deltas")
    with pytest.raises(FormatError, match="outside"):
        slots.register("not-under-root", art, root=tmp_path / "other")
    (art / "tokenizer_config.json").unlink()
    (art / "tokenizer_config.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(FormatError, match="outside"):
        slots.register("linked", art, root=tmp_path / "deltas")
    assert slots.names() == ["ok"]
    assert all(torch.isfinite(p["row"]).all() for p in slots.pools.values())
