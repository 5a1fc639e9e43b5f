"""The suite is offline, and the packages keep their one-way imports."""

import socket
import subprocess
import sys

import pytest

from conftest import NetworkBlocked


def test_non_loopback_connections_fail_loudly():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(NetworkBlocked, match="must not reach the network"):
            s.connect(("203.0.113.7", 443))  # TEST-NET-3: blocked before any packet leaves


def test_loopback_is_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_hub_download_fails_offline():
    from huggingface_hub import hf_hub_download

    with pytest.raises(Exception):
        hf_hub_download("HuggingFaceTB/SmolVLM-256M-Instruct", "config.json")


@pytest.mark.parametrize(
    "modules, forbidden",
    [
        ("core.config, core.images, core.prompts, core.models, core.engine, core.tiny", ("gradio", "sqlalchemy")),
        ("annotation_db.db, annotation_db.store, annotation_db.export", ("torch", "gradio", "core", "training", "demo")),
    ],
)
def test_one_way_imports(modules, forbidden):
    code = (
        f"import sys; import {modules}; "
        f"bad = [m for m in {forbidden!r} if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{modules} imported {result.stdout.strip()} {result.stderr[-500:]}"


def test_demo_imports_only_the_demo_model_from_training():
    import ast
    from pathlib import Path

    found = set()
    for path in Path(__file__).resolve().parents[1].joinpath("demo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "training":
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "training"}
    assert found == {"training.demo_model"}
