"""SECURITY.md against the code: every limit and its default, the key comparison, what the
server never imports, the container's least privilege, and the offline dependency floor."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SECURITY = (ROOT / "SECURITY.md").read_text()


def limit_settings() -> list[str]:
    """Every setting that bounds what a client can make the server do."""
    return [n for n in Settings.model_fields if n.startswith("max_") or n.endswith("timeout_s")]


def test_security_md_gives_every_limit_with_its_default() -> None:
    names = limit_settings()
    assert {"max_decode_s", "body_timeout_s", "header_timeout_s", "max_connections"} <= set(names)
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `CAPTIONER_([A-Z_]+)` \| `([^`]+)`", SECURITY, flags=re.M)
    }
    for name in names:
        default = Settings.model_fields[name].default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        assert rows.get(name.upper()) == shown, f"SECURITY.md: CAPTIONER_{name.upper()}"


def test_security_md_describes_the_key_comparison_the_code_does() -> None:
    auth = (ROOT / "app" / "auth.py").read_text()
    assert "hmac.compare_digest" in auth and "hmac.compare_digest" in SECURITY
    for path in Settings().auth_exempt_paths:
        assert f"`{path}`" in SECURITY


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_serving_code_imports_no_network_client_shell_or_pickle() -> None:
    # "It fetches no URLs; it executes nothing from an upload": nothing the server runs could.
    # (captioner/data/ makes training corpora and may run tools; only training imports it.)
    banned = {"urllib", "requests", "httpx", "http", "socket", "subprocess", "pickle", "marshal"}
    serving = [*(ROOT / "app").rglob("*.py"), *(ROOT / "captioner").glob("*.py")]
    for path in serving:
        roots = {name.split(".")[0] for name in _imports(path)}
        assert not roots & banned, (path, roots & banned)
        if path.relative_to(ROOT).parts[0] == "app":
            assert not any(name.startswith("captioner.data") for name in _imports(path)), path


def test_compose_runs_the_api_unprivileged_on_a_read_only_root() -> None:
    api = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["api"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\S+)$", dockerfile, flags=re.M)
    assert api["user"] == user and not user.startswith("0")
    assert api["read_only"] is True
    assert any(mount.split(":")[0] == "/tmp" for mount in api["tmpfs"])
    assert api["cap_drop"] == ["ALL"] and "no-new-privileges:true" in api["security_opt"]


def test_the_offline_audit_passes_here_and_flags_an_old_version(monkeypatch) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "audit_offline.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import audit_offline
    finally:
        sys.path.remove(str(ROOT / "tools"))
    monkeypatch.setattr(audit_offline, "version", lambda package: "0.0.1")
    problems = audit_offline.below_minimum()
    assert len(problems) == len(audit_offline.MINIMUMS)
    assert any(p.startswith("h11 0.0.1 < 0.16.0: CVE-2025-43859") for p in problems)
    assert "pip-audit" in SECURITY and "tools/audit_offline.py" in SECURITY
