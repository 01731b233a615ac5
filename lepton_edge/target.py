"""The target contract, the registry of target plug-ins, and device profiles.

A target plug-in is a package (ours live in `targets/`, installed as `lepton_edge_targets`)
that exposes `PLUGIN = TargetPlugin(...)` and is registered under the entry-point group
`lepton_edge.targets`. The plug-in object itself is cheap to import: its compiler side
(`Target`: support + compile) and its runtime side (`Device`: probe + load + run) are named
as "module:attribute" strings and imported only when used, so a missing toolchain fails when
that target is used, and the runtime never imports a compiler.

This module must stay importable with numpy alone: the runtime uses the registry.
"""

from __future__ import annotations

import importlib
import platform
import tomllib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_edge.errors import TargetError

if TYPE_CHECKING:
    import numpy as np
    import onnx

ENTRY_POINT_GROUP = "lepton_edge.targets"


@dataclass(frozen=True)
class Profile:
    """A concrete device or board: which target compiles for it and with which settings."""

    name: str
    target: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)


@dataclass(frozen=True)
class Build:
    """What a target produced for one subgraph: files (name -> bytes) and facts about them."""

    target: str
    profile: str
    files: dict[str, bytes]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceInfo:
    """A device found on this machine (or the reason the kind is absent)."""

    kind: str  # the target name whose builds it runs
    name: str
    present: bool
    details: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class Target(ABC):
    """Compiler side of a plug-in: which nodes it takes, and how it builds a subgraph."""

    name: str

    def check_toolchain(self, profile: Profile) -> None:  # noqa: B027 - optional hook
        """Raise TargetError naming what to install when the toolchain for `profile` is absent."""

    @abstractmethod
    def unsupported_reason(self, node: onnx.NodeProto, graph: Any) -> str | None:
        """None if this target can run `node`; otherwise why not, in words a user reads."""

    @abstractmethod
    def compile(self, subgraph: onnx.ModelProto, profile: Profile) -> Build:
        """Build one standalone ONNX subgraph for `profile`."""

    def notes(self, subgraph: onnx.ModelProto, profile: Profile | None = None) -> list[str]:
        """Facts `explain` shows about how this target would build `subgraph` for `profile`
        (optional)."""
        del subgraph, profile
        return []


class Executable(ABC):
    """A loaded build: runs positional inputs in the subgraph's input order."""

    @abstractmethod
    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...


class Device(ABC):
    """Runtime side of a plug-in: is such a device here, can it take a build, run it."""

    kind: str
    # A device used only when the user names it (e.g. an FPGA C simulation): never a
    # silent stand-in for real hardware.
    explicit_only: bool = False

    @abstractmethod
    def probe(self) -> list[DeviceInfo]:
        """The devices of this kind on this machine (present or not, with a reason)."""

    def incompatibility(self, info: DeviceInfo, build_meta: dict[str, Any]) -> str | None:
        """None if `info` can run a build with `build_meta`; otherwise why not."""
        return None

    @abstractmethod
    def load(self, info: DeviceInfo, files: dict[str, Path], build_meta: dict[str, Any]
             ) -> Executable:
        """Load a build's files (already verified and extracted) onto the device."""


@dataclass(frozen=True)
class TargetPlugin:
    """What a plug-in registers: a name, a placement priority, and where its sides live."""

    name: str
    priority: int  # higher wins at placement when several devices can run a subgraph
    description: str
    target: str  # "module:attribute" of a Target subclass (compiler side)
    device: str  # "module:attribute" of a Device subclass (runtime side)
    default_profile: str = ""

    def make_target(self) -> Target:
        return _import_attr(self.target, self.name)()

    def make_device(self) -> Device:
        return _import_attr(self.device, self.name)()


def _import_attr(spec: str, name: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise TargetError(
            f"target '{name}' cannot be used here: importing {module_name} failed ({exc}); "
            "install its toolchain or pick another target"
        ) from None


_REGISTRY: dict[str, TargetPlugin] = {}
_ENTRY_POINTS_LOADED = False


def register(plugin: TargetPlugin) -> TargetPlugin:
    """Register a target plug-in; a name can be registered once."""
    if plugin.name in _REGISTRY:
        raise TargetError(f"a target named '{plugin.name}' is already registered")
    _REGISTRY[plugin.name] = plugin
    return plugin


def unregister(name: str) -> None:
    """Remove a plug-in (for tests and for replacing a target at run time)."""
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        module = ep.load()
        plugin = getattr(module, "PLUGIN", module)
        if not isinstance(plugin, TargetPlugin):
            raise TargetError(f"entry point '{ep.name}' ({ep.value}) has no TargetPlugin PLUGIN")
        if plugin.name != ep.name:
            raise TargetError(f"entry point '{ep.name}' registers a target named '{plugin.name}'")
        if plugin.name not in _REGISTRY:
            register(plugin)


def plugins() -> dict[str, TargetPlugin]:
    """All registered target plug-ins by name."""
    _load_entry_points()
    return dict(_REGISTRY)


def get_plugin(name: str) -> TargetPlugin:
    found = plugins()
    if name not in found:
        raise TargetError(
            f"unknown target '{name}'; known targets: {', '.join(sorted(found)) or 'none'}"
        )
    return found[name]


# ----------------------------------------------------------------------------- profiles


def profile_dirs() -> list[Path]:
    return [Path(str(resources.files("lepton_edge_targets") / "profiles"))]


def profiles() -> dict[str, Profile]:
    """Every profile shipped in targets/profiles/*.toml, by name."""
    found: dict[str, Profile] = {}
    for folder in profile_dirs():
        for path in sorted(folder.glob("*.toml")):
            with path.open("rb") as f:
                data = tomllib.load(f)
            name = data.pop("name", path.stem)
            found[name] = Profile(
                name=name, target=data.pop("target"), description=data.pop("description", ""),
                settings=data, path=str(path),
            )
    return found


def resolve(spec: str) -> tuple[TargetPlugin, Profile]:
    """Turn a `-t` value (a target name or a profile name) into a plug-in and a profile."""
    known_profiles = profiles()
    known_plugins = plugins()
    if spec in known_profiles:
        profile = known_profiles[spec]
        if profile.target not in known_plugins:
            raise TargetError(
                f"profile '{spec}' needs target '{profile.target}', which this version of "
                f"lepton-edge does not provide yet; available targets: "
                f"{', '.join(sorted(known_plugins))}"
            )
        return known_plugins[profile.target], profile
    if spec in known_plugins:
        plugin = known_plugins[spec]
        default = plugin.default_profile
        if default and default in known_profiles:
            return plugin, known_profiles[default]
        return plugin, Profile(name=spec, target=spec, description=plugin.description)
    raise TargetError(
        f"unknown target or profile '{spec}'; targets: {', '.join(sorted(known_plugins))}; "
        f"profiles: {', '.join(sorted(known_profiles))} (see `lepton-edge targets`)"
    )


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
