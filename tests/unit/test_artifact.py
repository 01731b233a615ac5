"""The .lepton format: anything corrupt, tampered or incompatible is an ArtifactError saying so.

One small MLP is compiled once for the module; each test tampers with its own copy. Every
refused load must leave the file it was given untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import lepton_edge
from tests.conftest import mlp
from lepton_edge import ArtifactError, LeptonError
from lepton_edge import artifact as fmt
from lepton_edge.runtime.session import SelfTestError

LIB = "builds/sg0/cpu/lib.so"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory):
    """(the in-memory Artifact, the path of its pristine .lepton, that file's sha256)."""
    art = lepton_edge.compile(lepton_edge.load(mlp()), ["cpu"])
    path = art.save(tmp_path_factory.mktemp("artifact") / "mlp.lepton")
    digest = file_hash(path)
    yield art, path, digest
    assert file_hash(path) == digest, "the module's pristine artifact was modified"


@pytest.fixture
def art_path(compiled, tmp_path: Path) -> Path:
    """A private copy of the compiled artifact, to tamper with."""
    return Path(shutil.copyfile(compiled[1], tmp_path / "copy.lepton"))


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def write_zip(path: Path, items: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    """Write a zip by hand (duplicates and odd names allowed) with the given entries in order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in items:
                zf.writestr(name, data)
    return path


def rewrite(path: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """Rewrite the artifact at `path` after `change` edits its entries (manifest untouched
    unless `change` edits it)."""
    files = entries(path)
    change(files)
    return write_zip(path, list(files.items()))


def edit_manifest(path: Path, change: Callable[[dict], None]) -> Path:
    def _change(files: dict[str, bytes]) -> None:
        manifest = json.loads(files[fmt.MANIFEST])
        change(manifest)
        files[fmt.MANIFEST] = json.dumps(manifest).encode()

    return rewrite(path, _change)


def refused(path: Path, *words: str, cls: type[LeptonError] = ArtifactError) -> str:
    """Loading `path` (artifact.read and runtime.load) fails with `cls`; file untouched."""
    before = file_hash(path) if path.is_file() else None
    with pytest.raises(cls) as info:
        fmt.read(path)
    assert type(info.value) is cls
    message = str(info.value)
    with pytest.raises(cls) as again:
        lepton_edge.runtime.load(path)
    assert str(again.value) == message
    assert "\n" not in message, "user errors are one line"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    if before is not None:
        assert file_hash(path) == before, "a refused load modified the artifact"
    return message


# ----------------------------------------------------------------------------- the happy path


def test_saved_artifact_verifies_and_runs(compiled, art_path: Path) -> None:
    art, _, _ = compiled
    verified = fmt.read(art_path)
    assert verified.files == art.files
    assert verified.manifest["schema_version"] == fmt.SCHEMA_VERSION
    assert set(verified.manifest["files"]) == set(art.files)
    with lepton_edge.runtime.load(art_path, self_test=True) as session:
        out = session.run({"x": np.ones((3, 4), np.float32)})
    assert out["y"].shape == (3, 3)


# ----------------------------------------------------------------------------- not an artifact


def test_missing_file(tmp_path: Path) -> None:
    refused(tmp_path / "nope.lepton", "artifact not found", "nope.lepton")


def test_directory(tmp_path: Path) -> None:
    refused(tmp_path, "is a directory, not a .lepton artifact")


@pytest.mark.parametrize("content", [
    pytest.param(np.random.default_rng(0).bytes(4096), id="random-bytes"),
    pytest.param(b"", id="empty"),
    pytest.param(b"PK\x03\x04 not really a zip", id="zip-magic-only"),
])
def test_not_a_zip(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.lepton"
    path.write_bytes(content)
    refused(path, "is not a lepton-edge artifact or is corrupt", "recompile the model")


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_zip(art_path: Path, fraction: float) -> None:
    data = art_path.read_bytes()
    art_path.write_bytes(data[: int(len(data) * fraction)])
    refused(art_path, "is not a lepton-edge artifact or is corrupt")


def test_damaged_bytes_anywhere_are_an_artifact_error(compiled, tmp_path: Path) -> None:
    """Flip bits across the whole file (headers, deflate streams, central directory): the
    result either still verifies with identical contents or is an ArtifactError."""
    art, source, _ = compiled
    data = source.read_bytes()
    path = tmp_path / "damaged.lepton"
    positions = sorted(set(range(0, len(data), max(1, len(data) // 150)))
                       | set(range(len(data) - 200, len(data))) | set(range(0, 64)))
    refusals = 0
    for position in positions:
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            path.write_bytes(damaged)
            try:
                verified = fmt.read(path)
            except ArtifactError:
                refusals += 1
            else:  # e.g. a timestamp bit: harmless, and every file is still exact
                assert verified.files == art.files
    assert refusals > len(positions)


# ----------------------------------------------------------------------------- the manifest


def test_missing_manifest(art_path: Path) -> None:
    rewrite(art_path, lambda files: files.pop(fmt.MANIFEST))
    refused(art_path, "has no manifest.json", "not a lepton-edge artifact")


def test_manifest_not_json(art_path: Path) -> None:
    rewrite(art_path, lambda files: files.__setitem__(fmt.MANIFEST, b"{not json"))
    refused(art_path, "manifest.json is unreadable")


def test_manifest_of_another_format(art_path: Path) -> None:
    edit_manifest(art_path, lambda m: m.__setitem__("format", "something else"))
    refused(art_path, "manifest.json is not a lepton-edge manifest")


def test_newer_schema_version_says_to_upgrade(art_path: Path) -> None:
    edit_manifest(art_path, lambda m: m.__setitem__("schema_version", 99))
    refused(art_path, "schema version 99", f"reads version {fmt.SCHEMA_VERSION}",
            "Upgrade lepton-edge")


@pytest.mark.parametrize("version", [0, "1", True, None, 1.0])
def test_older_or_bogus_schema_version_says_to_recompile(art_path: Path, version) -> None:
    edit_manifest(art_path, lambda m: m.__setitem__("schema_version", version))
    message = refused(art_path, f"schema version {version!r}", "Recompile the model")
    assert "Upgrade" not in message


def test_manifest_lacking_a_section(art_path: Path) -> None:
    edit_manifest(art_path, lambda m: m.pop("subgraphs"))
    refused(art_path, "lacks 'subgraphs'", "damaged")


@pytest.mark.parametrize("files", [
    pytest.param([], id="list"),
    pytest.param({LIB: "abc"}, id="entry-not-a-dict"),
    pytest.param({LIB: {"size": 1}}, id="no-sha256"),
    pytest.param({LIB: {"sha256": "00", "size": "1"}}, id="size-not-int"),
])
def test_malformed_files_table(art_path: Path, files) -> None:
    edit_manifest(art_path, lambda m: m.__setitem__("files", files))
    refused(art_path, "malformed 'files' table", "damaged")


def _drop_build_files(m: dict) -> None:
    del m["subgraphs"][0]["builds"][0]["files"]


def _unlisted_build_file(m: dict) -> None:
    m["subgraphs"][0]["builds"][0]["files"]["lib.so"] = "builds/sg0/cpu/other.so"


def _unlisted_golden_file(m: dict) -> None:
    m["golden"][0]["outputs"]["y"] = "golden/9/outputs/0.npy"


@pytest.mark.parametrize("change, words", [
    pytest.param(lambda m: m.__setitem__("inputs", [{"name": "x"}]),
                 "'inputs' must list tensors", id="input-without-dtype"),
    pytest.param(lambda m: m.__setitem__("outputs", "y"), "'outputs' must list", id="outputs"),
    pytest.param(lambda m: m.__setitem__("subgraphs", {"sg0": {}}),
                 "'subgraphs' is not a list", id="subgraphs-dict"),
    pytest.param(lambda m: m["subgraphs"][0].pop("level"),
                 "subgraph 'sg0' lacks an id, level", id="subgraph-without-level"),
    pytest.param(_drop_build_files, "a build of subgraph 'sg0' lacks", id="build-without-files"),
    pytest.param(_unlisted_build_file, "names files not in the artifact: "
                 "['builds/sg0/cpu/other.so']", id="build-file-unlisted"),
    pytest.param(_unlisted_golden_file, "a golden case names files not in the artifact",
                 id="golden-file-unlisted"),
    pytest.param(lambda m: m.__setitem__("model", "mlp"), "'model' is not a table", id="model"),
    pytest.param(lambda m: m.__setitem__("versions", []), "'versions' is not a table",
                 id="versions"),
])
def test_malformed_layout(art_path: Path, change, words: str) -> None:
    """A manifest edited consistently (hashes untouched) but into a shape the runtime cannot
    read is an ArtifactError, not a KeyError later."""
    edit_manifest(art_path, change)
    refused(art_path, "manifest.json is malformed", words, "recompile the model")


# ----------------------------------------------------------------------------- the files


def test_altered_build_file(art_path: Path) -> None:
    def flip(files: dict[str, bytes]) -> None:
        lib = bytearray(files[LIB])
        lib[len(lib) // 2] ^= 0xFF
        files[LIB] = bytes(lib)

    rewrite(art_path, flip)
    refused(art_path, f"'{LIB}' does not match its sha256", "altered or damaged",
            "recompile or copy it again")


def test_altered_golden_file(art_path: Path) -> None:
    rewrite(art_path, lambda files: files.__setitem__("golden/0/outputs/0.npy",
                                                      fmt.array_bytes(np.zeros((1, 3)))))
    refused(art_path, "'golden/0/outputs/0.npy' does not match its sha256")


def test_deleted_file(art_path: Path) -> None:
    rewrite(art_path, lambda files: files.pop(LIB))
    refused(art_path, "does not match its manifest", f"missing: ['{LIB}']",
            "not listed: none", "recompile")


def test_extra_file(art_path: Path) -> None:
    rewrite(art_path, lambda files: files.__setitem__("builds/sg0/cpu/extra.so", b"\x7fELF"))
    refused(art_path, "missing: none", "not listed: ['builds/sg0/cpu/extra.so']")


@pytest.mark.parametrize("name", ["../evil.so", "/abs", "builds/../../evil.so", "a\\..\\b",
                                  "C:evil", ".", "./"])
def test_entry_outside_the_folder(art_path: Path, name: str) -> None:
    rewrite(art_path, lambda files: files.__setitem__(name, b"payload"))
    refused(art_path, f"entry '{name}' would extract outside its folder")


def test_duplicate_entries(art_path: Path) -> None:
    files = entries(art_path)
    items = list(files.items()) + [(LIB, b"a second, different lib.so")]
    write_zip(art_path, items)
    refused(art_path, "duplicate entries", "tampered")


def test_symbolic_link_entry(art_path: Path) -> None:
    files = entries(art_path)
    link = zipfile.ZipInfo("builds/sg0/cpu/link.so")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    write_zip(art_path, [*files.items(), (link, b"/etc/passwd")])
    refused(art_path, "'builds/sg0/cpu/link.so' is a symbolic link")


def test_consistent_tampering_is_caught_by_the_self_test(art_path: Path) -> None:
    """A golden output replaced *with* a matching manifest hash passes verification, but the
    self-test replays it and fails."""
    path = "golden/0/outputs/0.npy"

    def swap(files: dict[str, bytes]) -> None:
        original = fmt.array_from_bytes(files[path], path)
        files[path] = fmt.array_bytes(original + 1.0)
        manifest = json.loads(files[fmt.MANIFEST])
        manifest["files"][path] = {"sha256": fmt.sha256(files[path]), "size": len(files[path])}
        files[fmt.MANIFEST] = json.dumps(manifest).encode()

    rewrite(art_path, swap)
    fmt.read(art_path)  # verifies: the manifest was rewritten consistently
    with pytest.raises(SelfTestError) as info:
        lepton_edge.runtime.load(art_path, self_test=True)
    assert "self-test FAIL" in str(info.value) and "y: max abs" in str(info.value)


def test_arrays_are_never_unpickled(tmp_path: Path) -> None:
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = fmt.write(tmp_path / "p.lepton",
                     {"format": fmt.FORMAT, "schema_version": fmt.SCHEMA_VERSION, "inputs": [],
                      "outputs": [], "subgraphs": [], "versions": {}},
                     {"golden/0/inputs/0.npy": pickled.read_bytes(),
                      "golden/0/inputs/1.npy": b"not an array"})
    verified = fmt.read(path)
    for name in ("golden/0/inputs/0.npy", "golden/0/inputs/1.npy"):
        with pytest.raises(ArtifactError, match=rf"p.lepton:{name} is not a valid .npy array"):
            verified.array(name)


# ----------------------------------------------------------------------------- saving


def test_saved_file_mode_follows_the_umask(compiled, tmp_path: Path) -> None:
    art, _, _ = compiled
    umask = os.umask(0o022)
    try:
        path = art.save(tmp_path / "mode.lepton")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_overwrites_atomically(compiled, tmp_path: Path) -> None:
    art, source, _ = compiled
    target = tmp_path / "out.lepton"
    target.write_bytes(b"old contents")
    assert art.save(target) == target
    assert fmt.read(target).files == art.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.lepton"]


@pytest.mark.parametrize("failure", [
    pytest.param(RuntimeError("boom"), id="any-exception"),
    pytest.param(OSError(28, "No space left on device"), id="disk-full"),
    pytest.param(KeyboardInterrupt(), id="interrupted"),
])
def test_failed_save_keeps_the_old_file(compiled, tmp_path: Path, monkeypatch,
                                        failure: BaseException) -> None:
    art, source, _ = compiled
    target = Path(shutil.copyfile(source, tmp_path / "model.lepton"))
    before = file_hash(target)
    calls = []

    def failing_writestr(self, name, data, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:  # fail mid-way, after some entries were written
            raise failure
        return original_writestr(self, name, data, *args, **kwargs)

    original_writestr = zipfile.ZipFile.writestr
    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_writestr)
    expected = ArtifactError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected) as info:
        art.save(target)
    if expected is ArtifactError:
        assert "cannot write" in str(info.value) and "No space left" in str(info.value)
        assert "left as it was" in str(info.value)
    monkeypatch.undo()
    assert file_hash(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lepton"], "temp file left"
    fmt.read(target)


def test_save_to_a_directory(compiled, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is a directory; give a file name"):
        compiled[0].save(tmp_path)


def test_save_under_a_file(compiled, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match=r"cannot write .*file/out.lepton"):
        compiled[0].save(blocker / "out.lepton")


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root ignores folder permissions")
def test_save_into_a_read_only_folder(compiled, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ArtifactError, match="cannot write"):
            compiled[0].save(folder / "out.lepton")
    finally:
        folder.chmod(0o700)


def test_save_refuses_entry_names_outside_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"'../evil.so' would extract outside"):
        fmt.write(tmp_path / "x.lepton", {"format": fmt.FORMAT}, {"../evil.so": b""})
    assert list(tmp_path.iterdir()) == []


def test_golden_compare_handles_nan_and_infinities() -> None:
    """The golden-output check (runtime.session.compare): NaN matches NaN, an infinity the
    same infinity, and a real error next to an infinity is still measured relative to the
    largest finite reference value."""
    from lepton_edge.runtime.session import compare

    inf, nan = np.inf, np.nan
    want = np.array([inf, -inf, nan, 2.0], np.float32)
    assert compare(want.copy(), want) == (0.0, 0.0)
    for bad in ([-inf, -inf, nan, 2.0], [inf, -inf, 0.0, 2.0], [inf, -inf, nan, nan]):
        assert compare(np.array(bad, np.float32), want) == (float("inf"), float("inf"))
    absolute, relative = compare(np.array([inf, -inf, nan, 3.0], np.float32), want)
    assert (absolute, relative) == (1.0, 0.5)
