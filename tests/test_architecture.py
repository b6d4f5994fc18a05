"""The layering ARCHITECTURE.md describes, checked on the source (``ast``, nothing imported).

``app/`` is the HTTP layer: it never touches tensors or pixels itself, so no module there
imports torch or an image/video decoder; ``captioner.inference.Captioner`` does that work.
``captioner/`` is the library: nothing in it imports the web stack, only the CLI's ``serve``
command reaches into ``app``, and its modules import only their own layer or those below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TENSOR_AND_MEDIA = {"torch", "torchvision", "timm", "PIL", "av", "safetensors"}
WEB = {"fastapi", "starlette", "uvicorn", "pydantic_settings", "app"}
CLI_MAY_SERVE = {"captioner/cli.py": {"app"}}  # `captioner serve` starts app.serve, lazily


# ARCHITECTURE.md's layers of captioner/, bottom up; a package's __init__ is its own name.
LAYERS = {
    "leaves": ["captioner", "config", "vocab", "errors", "media_types", "retrieval", "progress"],
    "parts": [
        "checkpoint",
        "model",
        "memory",
        "encoder",
        "onnx_encoder",
        "domain",
        "tags",
        "weights",
        "decoding",
        "media",
        "device",
        "data",
    ],
    "uses": ["inference", "training", "evaluation", "batch"],
    "entry": ["cli", "cli_train"],
}


def imported_modules(path: Path) -> set[str]:
    """The modules a module imports, anywhere in it (function bodies included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports."""
    return {name.split(".")[0] for name in imported_modules(path)}


def layer(module: str) -> int:
    """The layer of a captioner module (``captioner.data.readers`` is in ``data``'s)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else parts[0]
    (index,) = [i for i, names in enumerate(LAYERS.values()) if name in names]
    return index


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("app"), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_http_layer_never_imports_torch_or_media_decoders(path: Path) -> None:
    assert not imported_packages(path) & TENSOR_AND_MEDIA


@pytest.mark.parametrize("path", modules("captioner"), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_library_never_imports_the_web_stack(path: Path) -> None:
    allowed = CLI_MAY_SERVE.get(path.relative_to(ROOT).as_posix(), set())
    assert not imported_packages(path) & (WEB - allowed)


@pytest.mark.parametrize("path", modules("captioner"), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_library_imports_only_its_own_layer_and_those_below(path: Path) -> None:
    relative = path.relative_to(ROOT).with_suffix("")
    module = ".".join(part for part in relative.parts if part != "__init__")
    if module == "captioner":
        return  # the package's face: it re-exports Captioner lazily (see captioner/__init__)
    above = {
        name
        for name in imported_modules(path)
        if name.split(".")[0] == "captioner" and layer(name) > layer(module)
    }
    assert not above


def test_training_does_not_depend_on_the_serving_interface() -> None:
    assert "captioner.inference" not in imported_modules(ROOT / "captioner" / "training.py")


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import torch.nn\ndef f():\n    from PIL import Image\nfrom . import x\n")
    assert imported_packages(module) == {"torch", "PIL"}
    assert len(modules("app")) > 10 and len(modules("captioner")) > 20
    examples = ("captioner.vocab", "captioner.data.readers", "captioner.cli")
    assert [layer(m) for m in examples] == [0, 1, 3]
    listed = {name for names in LAYERS.values() for name in names} - {"captioner"}
    present = {p.stem for p in (ROOT / "captioner").glob("*.py")} | {"data", "batch"}
    assert listed == present - {"__init__"}, "a module is missing from LAYERS (and the docs)"
