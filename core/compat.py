"""Installed versions of the libraries DermaLoop leans on, and combinations known to break.

    python -m demo --versions        # prints the versions and any warning

`versions()` reads package metadata only (nothing is imported, so it is instant and
safe before `spaces` on ZeroGPU). `warnings(versions())` returns one line per known
incompatible combination; the app prints them at start. Add a rule to `RULES` when
a release is found to break us (and an upper bound in pyproject.toml).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "gradio", "sqlalchemy")


@dataclass(frozen=True)
class Rule:
    """When `package` is in `when` and `other` is in `needs_not`, say `why`."""

    package: str
    when: str
    other: str
    needs_not: str
    why: str


RULES = (
    # transformers 5.24 refuses peft < 0.22 when an adapter is loaded (seen 2026-11-24).
    Rule("transformers", ">=5.24", "peft", "<0.22",
         "loading a LoRA adapter fails; install the locked versions: pip install -c requirements.lock -e ."),
)


def versions() -> dict[str, str | None]:
    """Installed version of each package in PACKAGES (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _within(installed: str | None, spec: str) -> bool:
    if installed is None:
        return False
    try:
        return Version(installed) in SpecifierSet(spec, prereleases=True)
    except InvalidVersion:
        return False


def warnings(installed: dict[str, str | None]) -> list[str]:
    """One line per known-incompatible combination in `installed`."""
    return [
        f"warning: {r.package} {installed[r.package]} with {r.other} {installed[r.other]} is known not to work: {r.why}"
        for r in RULES
        if _within(installed.get(r.package), r.when) and _within(installed.get(r.other), r.needs_not)
    ]


def report() -> str:
    """What `--versions` prints: one `name version` line per package, then the warnings."""
    installed = versions()
    lines = [f"{name} {v or 'not installed'}" for name, v in installed.items()]
    return "\n".join(lines + warnings(installed))
