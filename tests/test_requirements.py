"""The lock (requirements.lock), requirements.txt for Spaces, pyproject's ranges and what is
installed agree; the README's Spaces front matter matches what is pinned and used."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from core import compat

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(path: Path) -> list[Requirement]:
    """Every `name==version ; marker` line of a lock file."""
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


def here(reqs: list[Requirement]) -> dict[str, Version]:
    """The pins that apply to this interpreter and platform, by canonical name."""
    out: dict[str, Version] = {}
    for r in reqs:
        if r.marker is None or r.marker.evaluate():
            name = canonicalize_name(r.name)
            assert name not in out, f"{name} is pinned twice for this platform"
            out[name] = Version(next(iter(r.specifier)).version)
    return out


def declared(extras: tuple[str, ...] = ()) -> list[Requirement]:
    reqs = [Requirement(d) for d in pyproject()["dependencies"]]
    for extra in extras:
        reqs += [Requirement(d) for d in pyproject()["optional-dependencies"][extra]]
    return reqs


def test_every_lock_line_is_an_exact_pin():
    for path in (ROOT / "requirements.lock", ROOT / "requirements.txt"):
        for r in pins(path):
            assert len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==", f"{path.name}: {r} is not a pin"


def test_the_lock_satisfies_pyproject_ranges():
    locked = pins(ROOT / "requirements.lock")
    for req in declared(("test",)):
        versions = [Version(next(iter(p.specifier)).version) for p in locked
                    if canonicalize_name(p.name) == canonicalize_name(req.name)]
        assert versions, f"{req.name} is declared in pyproject.toml but not locked"
        for v in versions:
            assert req.specifier.contains(v, prereleases=True), f"lock has {req.name}=={v}, outside pyproject's {req}"


def _closure(roots: list[Requirement]) -> set[str]:
    """Names of every installed distribution `roots` need here, transitively (markers and extras applied)."""
    names: set[str] = set()
    seen: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for ex in ("", *sorted(req.extras)):
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            names.add(name)
            try:
                requires = distribution(req.name).requires or []
            except PackageNotFoundError:
                pytest.fail(f"{req.name} is required but not installed")
            todo += [(Requirement(sub), ex) for sub in requires]
    return names


def test_the_lock_covers_every_package_the_app_and_tests_need():
    needed = _closure(declared(("test",)))
    locked = set(here(pins(ROOT / "requirements.lock")))
    assert not needed - locked, f"needed but not locked: {sorted(needed - locked)}"


def test_what_is_installed_is_what_is_locked():
    """CI installs with `-c requirements.lock`: anything else means the README's command drifted."""
    for name, pinned in here(pins(ROOT / "requirements.lock")).items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            continue  # locked for another platform's needs (e.g. a Windows-only helper)
        assert installed.public == pinned.public, f"{name} {installed} is installed but the lock says {pinned}"


def test_requirements_txt_is_the_apps_part_of_the_lock():
    lock = {(canonicalize_name(r.name), str(r.specifier)) for r in pins(ROOT / "requirements.lock")}
    spaces = pins(ROOT / "requirements.txt")
    for r in spaces:  # markers may be phrased differently; the versions must be the lock's
        assert (canonicalize_name(r.name), str(r.specifier)) in lock, f"requirements.txt {r} is not in the lock"
    names = {canonicalize_name(r.name) for r in spaces}
    missing = {canonicalize_name(r.name) for r in declared()} - names
    assert not missing, f"requirements.txt lacks runtime dependencies {sorted(missing)}"
    assert "pytest" not in names, "requirements.txt should hold the app's dependencies only"


def test_transformers_has_an_upper_bound_below_the_release_that_refuses_our_peft():
    req = next(r for r in declared() if r.name == "transformers")
    assert not req.specifier.contains("5.24.0"), "transformers 5.24 refuses peft < 0.22; keep it out until peft catches up"


@pytest.mark.parametrize("transformers, peft, warned", [
    ("5.24.0", "0.21.2", True),
    ("5.25.1", "0.21.0", True),
    ("5.23.0", "0.21.2", False),
    ("5.24.0", "0.22.0", False),
    ("5.24.0", None, False),
])
def test_the_version_check_warns_about_known_bad_combinations(transformers, peft, warned):
    lines = compat.warnings({"transformers": transformers, "peft": peft})
    assert len(lines) == int(warned)
    if warned:
        assert "\n" not in lines[0] and transformers in lines[0] and peft in lines[0]


def test_demo_versions_prints_the_libraries():
    out = subprocess.run([sys.executable, "-m", "demo", "--versions"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = dict(line.split(" ", 1) for line in out.stdout.splitlines() if not line.startswith("warning"))
    for name in ("torch", "transformers", "peft", "gradio", "trl"):
        assert got[name] == version(name)


def front_matter() -> dict:
    match = re.match(r"---\n(.*?)\n---\n", (ROOT / "README.md").read_text(), flags=re.S)
    assert match, "README.md has no Hugging Face Spaces front matter"
    import yaml

    return yaml.safe_load(match.group(1))


def test_spaces_front_matter_matches_the_pinned_gradio():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and (ROOT / "app.py").exists()
    sdk = Version(str(meta["sdk_version"]))
    assert sdk == here(pins(ROOT / "requirements.txt"))["gradio"], "sdk_version differs from the locked gradio"
    assert sdk == Version(version("gradio")), f"sdk_version {sdk} but gradio {version('gradio')} is installed and tested"
    assert str(meta.get("python_version", "")).startswith("3.")


def test_spaces_front_matter_enables_hugging_face_sign_in_the_app_uses():
    uses_login_button = "LoginButton" in "".join(p.read_text() for p in (ROOT / "demo").glob("*.py"))
    assert uses_login_button, "the app no longer offers Hugging Face sign-in: drop hf_oauth too"
    assert front_matter().get("hf_oauth") is True, "gr.LoginButton needs `hf_oauth: true` in the Space's front matter"


def test_console_scripts_point_at_the_python_m_entry_points():
    import importlib

    scripts = pyproject()["scripts"]
    assert {"dermaloop-app", "dermaloop-refine"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
