"""The README's quick start, as a newcomer reads it: what comes first, and what it installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def flat(text: str) -> str:
    return " ".join(text.split())


def test_the_quick_start_comes_first() -> None:
    assert re.findall(r"^## (.+)$", README, flags=re.M)[0] == "Quick start"


def test_what_the_default_model_knows_comes_before_the_first_example() -> None:
    first_example = README.index("```")
    said = flat(README[:first_example])
    assert "describes that domain only" in said and "coloured shapes" in said


def quick_start_block(marker: str) -> str:
    section = README.split("## Quick start")[1].split("\n## ")[0]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if marker in b]
    return block.replace("\\\n", " ")


def test_the_cpu_only_install_is_the_dockerfiles_index_with_the_packages_bounds() -> None:
    cpu = quick_start_block("CPU only")
    index = re.search(r"ARG TORCH_INDEX_URL=(\S+)", (ROOT / "Dockerfile").read_text())[1]
    assert f"--index-url {index}" in cpu
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        (bounds,) = [d for d in dependencies if re.match(rf"{name}[<>=]", d)]
        assert f'"{bounds}"' in cpu, name
    assert cpu.strip().endswith("python -m pip install -e .")
    for install in (cpu, quick_start_block("The default")):
        assert re.search(r"about [\d.]+ GB", install), install  # the disk it needs


def test_the_readme_shows_the_screenshot_the_browser_tests_make() -> None:
    assert "](docs/screenshot.png)" in README
    with Image.open(ROOT / "docs" / "screenshot.png") as shot:
        # tests/test_web.py's desktop viewport, a full page: the whole answer is on it.
        assert shot.format == "PNG" and shot.width == 1000 and shot.height > 900
