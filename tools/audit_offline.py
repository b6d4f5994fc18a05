"""An offline floor for the dependency audit: installed versions against minimums that fix known
advisories, for the packages that parse untrusted input or load files.

pip-audit needs network access (PyPI's JSON API or OSV); this needs none, and knows only the
advisories listed here. Run pip-audit wherever there is network access, and update this list.

    python tools/audit_offline.py     # exit 1, naming each package below its minimum
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


@dataclass(frozen=True)
class Minimum:
    package: str
    version: str
    why: str


MINIMUMS = (
    Minimum("pillow", "10.3.0", "CVE-2024-28219 (buffer overflow, _imagingcms); CVE-2023-50447"),
    Minimum("python-multipart", "0.0.18", "CVE-2024-53981 (DoS: logging around boundaries)"),
    Minimum("starlette", "0.49.1", "CVE-2025-62727 (Range header, FileResponse); CVE-2025-54121"),
    Minimum("h11", "0.16.0", "CVE-2025-43859 (request smuggling: lenient chunked encoding)"),
    Minimum("fastapi", "0.109.1", "CVE-2024-24762 (ReDoS in form Content-Type parsing)"),
    Minimum("torch", "2.6.0", "CVE-2025-32434 (code execution via torch.load weights_only=True)"),
    Minimum("onnx", "1.17.0", "CVE-2024-27318, CVE-2024-5187 (path traversal, file overwrite)"),
)


def below_minimum() -> list[str]:
    """One line per listed package whose installed version is under its minimum."""
    problems = []
    for minimum in MINIMUMS:
        try:
            installed = version(minimum.package)
        except PackageNotFoundError:
            continue  # not installed: nothing to audit
        if Version(installed) < Version(minimum.version):
            problems.append(
                f"{minimum.package} {installed} < {minimum.version}: {minimum.why}; upgrade it"
            )
    return problems


def main() -> int:
    problems = below_minimum()
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {len(MINIMUMS)} packages at or above their minimums (offline floor only)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
