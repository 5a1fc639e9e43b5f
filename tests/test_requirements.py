"""requirements.txt (what a Hugging Face Space installs) stays in step with pyproject.toml,
and the README's Spaces front matter matches the Gradio that is pinned and installed."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _normalise(line: str) -> str:
    req = Requirement(line)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name.lower().replace('_', '-')}{extras}{','.join(sorted(str(s) for s in req.specifier))}{marker}"


def pyproject_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def requirements() -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    return [ln for ln in lines if ln]


def test_requirements_txt_matches_pyproject_dependencies():
    ours, theirs = sorted(map(_normalise, requirements())), sorted(map(_normalise, pyproject_dependencies()))
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    assert not missing and not extra, (
        f"requirements.txt differs from pyproject.toml: missing {missing}, not in pyproject {extra}")
    assert len(ours) == len(set(ours)), "requirements.txt lists a package twice"


def front_matter() -> dict[str, str]:
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else ""
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    if not match:
        pytest.skip("README.md has no Hugging Face Spaces front matter yet")
    import yaml

    return yaml.safe_load(match.group(1))


def test_spaces_front_matter_matches_the_pinned_gradio():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and (ROOT / "app.py").exists()
    sdk = Version(str(meta["sdk_version"]))
    gradio_req = next(Requirement(d) for d in pyproject_dependencies() if Requirement(d).name == "gradio")
    assert sdk in gradio_req.specifier, f"sdk_version {sdk} is outside pyproject's {gradio_req}"
    assert sdk == Version(version("gradio")), f"sdk_version {sdk} but gradio {version('gradio')} is installed and tested"
    assert str(meta.get("python_version", "")).startswith("3.")
