"""The .lepton format: a zip of manifest.json plus build files, verified before use.

Layout (schema version 1):
  manifest.json                     versions, signature, subgraphs and their builds, golden
                                    I/O, and the sha256 + size of every other file
  builds/<subgraph>/<target>/...    what each target produced for each subgraph
  golden/<i>/{in,out}/<name>.npy    reference inputs and onnxruntime outputs (a sequence:
                                    one <name>.<j>.npy per element; an absent optional: none)

Reading verifies everything before anything is loaded: the zip itself, entry names that
would escape the extraction folder, the schema version, and every file against its sha256.
Nothing here unpickles: arrays are read with numpy's allow_pickle=False.
This module is shared with the runtime, so it depends on numpy and the standard library.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from lepton_edge.errors import ArtifactError
from lepton_edge.signature import KINDS, TENSOR

FORMAT = "lepton-edge artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAX_FILE_BYTES = 8 * 2**30  # refuse absurd sizes before reading (zip bombs)
# What zipfile raises for a damaged entry: bad CRC or header (BadZipFile), a damaged deflate
# stream (zlib.error), a flipped compression-method or encryption bit (NotImplementedError,
# RuntimeError), a cut-off file (EOFError, OSError).
_ENTRY_ERRORS = (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError,
                 OSError)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"), allow_pickle=False)  # keeps 0-d arrays 0-d
    return buffer.getvalue()


def array_from_bytes(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{where} is not a valid .npy array: {exc}") from None


def store_value(files: dict[str, bytes], path: str, value: Any) -> str | list[str] | None:
    """Add a golden value to `files`; return the reference the manifest records for it.

    An array is stored at `path` (a .npy name) and referenced by it; a sequence (list of
    arrays) as one file per element (`<path stem>.<i>.npy`), referenced by the list of
    their names; an absent optional (None) stores nothing and is recorded as null.
    """
    if value is None:
        return None
    if isinstance(value, list | tuple):
        stem = path.removesuffix(".npy")
        names = [f"{stem}.{i}.npy" for i in range(len(value))]
        for name, element in zip(names, value, strict=True):
            files[name] = array_bytes(np.asarray(element))
        return names
    files[path] = array_bytes(np.asarray(value))
    return path


def write(path: str | os.PathLike[str], manifest: dict[str, Any], files: dict[str, bytes]
          ) -> Path:
    """Write an artifact atomically: a failure never leaves a half-written file at `path`."""
    path = Path(path)
    manifest = dict(manifest)
    manifest["files"] = {name: {"sha256": sha256(data), "size": len(data)}
                         for name, data in sorted(files.items())}
    for name in files:
        _check_name(name)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; give a file name such as model.lepton")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}; choose a writable "
                            "folder") from None
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            for name, data in sorted(files.items()):
                zf.writestr(name, data)
        umask = os.umask(0)  # mkstemp makes 0600 files; give the usual umask-based mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}; {path} was left as "
                            "it was") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_name(name: str) -> None:
    pure = PurePosixPath(name)
    if (not name or "\\" in name or pure.is_absolute() or not pure.parts or ".." in pure.parts
            or name.startswith("/") or ":" in pure.parts[0]):
        raise ArtifactError(
            f"artifact entry '{name}' would extract outside its folder; refusing the artifact"
        )


@dataclass(frozen=True)
class VerifiedArtifact:
    """A .lepton file whose every entry was checked; file contents stay in memory."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]

    def array(self, name: str) -> np.ndarray:
        return array_from_bytes(self.files[name], f"{self.path.name}:{name}")

    def value(self, ref: str | list[str] | None) -> Any:
        """A golden value from its manifest reference (see store_value): an array, a list
        of arrays (a sequence) or None (an absent optional)."""
        if ref is None:
            return None
        if isinstance(ref, list):
            return [self.array(name) for name in ref]
        return self.array(ref)

    def extract(self, names: list[str], dest: Path) -> dict[str, Path]:
        """Write verified entries under `dest` (created private) and return their paths."""
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        out: dict[str, Path] = {}
        for name in names:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.files[name])
            out[name] = target
        return out


def read(path: str | os.PathLike[str]) -> VerifiedArtifact:
    """Open and fully verify an artifact; every failure is an ArtifactError saying why."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not a .lepton artifact")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError) as exc:
        raise ArtifactError(
            f"{path} is not a lepton-edge artifact or is corrupt ({exc}); recompile the model"
        ) from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise ArtifactError(f"{path} has duplicate entries; refusing a tampered artifact")
        for info in infos:
            _check_name(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArtifactError(f"{path}: entry '{info.filename}' is a symbolic link")
            if info.file_size > MAX_FILE_BYTES:
                raise ArtifactError(f"{path}: entry '{info.filename}' claims {info.file_size} "
                                    "bytes; refusing")
        if MANIFEST not in names:
            raise ArtifactError(f"{path} has no {MANIFEST}; it is not a lepton-edge artifact")
        try:
            manifest = json.loads(zf.read(MANIFEST))
        except (ValueError, *_ENTRY_ERRORS) as exc:
            raise ArtifactError(f"{path}: {MANIFEST} is unreadable ({exc})") from None
        _check_manifest(manifest, path)
        listed: dict[str, dict[str, Any]] = manifest["files"]
        extra = sorted(set(names) - set(listed) - {MANIFEST})
        missing = sorted(set(listed) - set(names))
        if extra or missing:
            raise ArtifactError(
                f"{path} does not match its manifest (missing: {missing or 'none'}; "
                f"not listed: {extra or 'none'}); the artifact was altered, recompile it"
            )
        files: dict[str, bytes] = {}
        for name, entry in listed.items():
            try:
                data = zf.read(name)
            except _ENTRY_ERRORS as exc:
                raise ArtifactError(
                    f"{path}: entry '{name}' is corrupt ({exc}); the artifact was damaged, "
                    "recompile or copy it again"
                ) from None
            if len(data) != entry.get("size") or sha256(data) != entry.get("sha256"):
                raise ArtifactError(
                    f"{path}: '{name}' does not match its sha256 in the manifest; the artifact "
                    "was altered or damaged in transfer, recompile or copy it again"
                )
            files[name] = data
    return VerifiedArtifact(path=path, manifest=manifest, files=files)


def _check_manifest(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: {MANIFEST} is not a lepton-edge manifest")
    version = manifest.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # noqa: E721 - True == 1
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise ArtifactError(
            f"{path} has artifact schema version {version!r}; this lepton-edge reads version "
            f"{SCHEMA_VERSION}. " + ("Upgrade lepton-edge on this device" if newer
                                     else "Recompile the model with this lepton-edge")
        )
    for key in ("files", "inputs", "outputs", "subgraphs", "versions"):
        if key not in manifest:
            raise ArtifactError(f"{path}: {MANIFEST} lacks '{key}'; the artifact is damaged")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and type(entry.get("size")) is int for entry in files.values()):
        raise ArtifactError(f"{path}: {MANIFEST} has a malformed 'files' table (each entry "
                            "needs a sha256 and a size); the artifact is damaged")
    problem = _layout_problem(manifest)
    if problem:
        raise ArtifactError(f"{path}: {MANIFEST} is malformed ({problem}); the artifact is "
                            "damaged, recompile the model")


def _layout_problem(manifest: dict[str, Any]) -> str | None:
    """What the runtime and `inspect` read must be there with the right types, and every
    file a build or golden case names must be in the verified files table."""

    def is_list_of_dicts(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)

    def is_name_map(value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in value.items())

    files = manifest["files"]
    if not isinstance(manifest.get("versions"), dict):
        return "'versions' is not a table"
    model = manifest.get("model", {})
    if not isinstance(model, dict):
        return "'model' is not a table"
    def is_spec(s: dict[str, Any]) -> bool:
        kind = s.get("kind", TENSOR)
        shape = s.get("shape")
        return (isinstance(s.get("name"), str) and isinstance(s.get("dtype"), str)
                and kind in KINDS and (isinstance(shape, list) and all(
                    type(d) in (int, str) for d in shape) or shape is None and kind != TENSOR))

    def is_value_map(value: Any) -> bool:  # name -> array file, list of them, or None
        return isinstance(value, dict) and all(isinstance(k, str) and (
            v is None or isinstance(v, str) or isinstance(v, list) and all(
                isinstance(e, str) for e in v)) for k, v in value.items())

    def value_files(refs: dict[str, Any]) -> set[str]:
        return {n for v in refs.values() if v is not None
                for n in ([v] if isinstance(v, str) else v)}

    for kind in ("inputs", "outputs"):
        specs = manifest[kind]
        if not is_list_of_dicts(specs) or not all(is_spec(s) for s in specs):
            return (f"'{kind}' must list tensors with a name, dtype and shape (and a known "
                    f"kind: {', '.join(KINDS)})")
    if not is_list_of_dicts(manifest["subgraphs"]):
        return "'subgraphs' is not a list of subgraphs"
    for sg in manifest["subgraphs"]:
        if not (isinstance(sg.get("id"), str) and type(sg.get("level")) is int
                and isinstance(sg.get("inputs"), list) and isinstance(sg.get("outputs"), list)
                and is_list_of_dicts(sg.get("builds"))):
            return f"subgraph {sg.get('id')!r} lacks an id, level, inputs, outputs or builds"
        for build in sg["builds"]:
            if not (isinstance(build.get("target"), str) and type(build.get("priority")) is int
                    and is_name_map(build.get("files"))
                    and isinstance(build.get("meta", {}), dict)):
                return f"a build of subgraph '{sg['id']}' lacks a target, priority or files"
            unlisted = sorted(set(build["files"].values()) - set(files))
            if unlisted:
                return f"subgraph '{sg['id']}' names files not in the artifact: {unlisted}"
    golden = manifest.get("golden", [])
    if not is_list_of_dicts(golden):
        return "'golden' is not a list of cases"
    for case in golden:
        if not (is_value_map(case.get("inputs")) and is_value_map(case.get("outputs"))):
            return "a golden case lacks its inputs or outputs"
        named = value_files(case["inputs"]) | value_files(case["outputs"])
        unlisted = sorted(named - set(files))
        if unlisted:
            return f"a golden case names files not in the artifact: {unlisted}"
    return None
