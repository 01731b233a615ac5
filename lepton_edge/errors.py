"""The errors lepton-edge raises.

User errors (a bad model, a bad input, a tampered artifact, an absent device) derive from
`LeptonError` and carry a message that names the problem and what to do about it; the CLI
prints them as one line. Anything else escaping lepton-edge is a bug (`InternalError` or a
plain Python exception) and the CLI says so.
"""

from __future__ import annotations


class LeptonError(Exception):
    """A problem with what the user gave us; the message says what and what to do."""

    exit_code = 1


class ModelError(LeptonError):
    """The model file or object cannot be read or is not a valid ONNX model."""


class UnsupportedOpsError(ModelError):
    """One or more operators cannot be compiled or run; lists all of them at once."""

    def __init__(self, problems: list[str], hint: str = "") -> None:
        self.problems = list(problems)
        head = f"{len(self.problems)} unsupported operator(s): " + "; ".join(self.problems)
        super().__init__(head + (f". {hint}" if hint else ""))


class TargetError(LeptonError):
    """An unknown target or profile, or a target whose toolchain is missing."""


class ArtifactError(LeptonError):
    """A .lepton file that is corrupt, tampered with, or from an incompatible version."""


class InputError(LeptonError):
    """Run-time inputs that do not match the model's signature."""


class DeviceError(LeptonError):
    """A required device is absent, or a build cannot be placed on any present device."""


class InternalError(Exception):
    """A bug in lepton-edge (not a user error); please report it with --debug output."""
