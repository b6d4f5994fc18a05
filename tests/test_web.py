"""The page at ``/`` and the API docs at ``/docs`` in a real browser, over the real server.

Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) driven by
Playwright for Python (the ``dev`` extra) through ``executable_path``: nothing downloads a
browser. Without either, the module is skipped and says which is missing (CI sets
``CAPTIONER_REQUIRE_BROWSER=1``, which makes that a failure).

The server runs the shipped model, as a user would meet it. Every test checks that the browser
asked nothing of any other host. Screenshots go to ``$CAPTIONER_TEST_ARTIFACTS`` (default: a
folder in pytest's temporary directory); with ``CAPTIONER_UPDATE_SCREENSHOT=1`` the image test
also writes the README's ``docs/screenshot.png``.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.app_support import ROOT, Server, server_process


def missing(what: str) -> None:
    """Skip the module, or fail it where the browser tests must run (.ci/run says so)."""
    if os.environ.get("CAPTIONER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what}, and CAPTIONER_REQUIRE_BROWSER=1", pytrace=False)
    pytest.skip(what, allow_module_level=True)


try:
    from playwright import sync_api
except ImportError:
    missing("Playwright for Python is not installed (python -m pip install -e '.[dev]')")
CHROMIUM = os.environ.get("CAPTIONER_CHROMIUM") or shutil.which("chromium")
if CHROMIUM is None:
    missing("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SAMPLES = ROOT / "captioner" / "assets" / "samples"
SCREENSHOT = ROOT / "docs" / "screenshot.png"
WIDE = {"width": 1000, "height": 900}
PHONE = {"width": 375, "height": 740}
TIMEOUT_MS = 60_000  # a caption on a busy 2-core CI machine
sync_api.expect.set_options(timeout=TIMEOUT_MS)


@dataclass
class Tab:
    """A page in a fresh browser context, every URL it asked for and its uncaught errors."""

    page: sync_api.Page
    origin: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_only_this_server(self) -> None:
        """Everything came from the server (previews are blob: URLs of its origin), and no
        script failed."""
        assert self.requests, "no request was recorded"
        outside = [
            url
            for url in self.requests
            if not url.removeprefix("blob:").startswith(self.origin + "/")
        ]
        assert outside == [], outside
        assert self.errors == []


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    env = {
        "CAPTIONER_DEVICE": "cpu",
        "CAPTIONER_TORCH_THREADS": "1",
        # The page, not the CNN's runtime, is under test: skip the ONNX export at start-up.
        "CAPTIONER_ENCODER_RUNTIME": "torch",
    }
    with server_process(env, tmp_path_factory.mktemp("web") / "server.log", 120) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("CAPTIONER_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def tab(browser, server) -> Iterator[Callable[..., Tab]]:
    contexts = []

    def open_tab(
        path: str = "/",
        viewport: dict[str, int] = WIDE,
        before: Callable[[sync_api.Page], object] | None = None,
        origin: str | None = None,
    ) -> Tab:
        """``path`` of the server (or of ``origin``) in a new context; ``before(page)`` first."""
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        opened = Tab(page, origin or server.url)
        page.on("request", lambda request: opened.requests.append(request.url))
        page.on("pageerror", lambda error: opened.errors.append(str(error)))
        if before:
            before(page)
        page.goto(opened.origin + path)
        return opened

    yield open_tab
    for context in contexts:
        context.close()


def ready(tab: Tab) -> None:
    """Wait until the page has read /v1/models (the options hold the model's defaults)."""
    sync_api.expect(tab.page.locator("#model")).to_contain_text("Model ")


def caption_with(tab: Tab, files: list[Path] | list[dict], **options: int) -> None:
    page = tab.page
    page.set_input_files("#files", files)
    for name, value in options.items():
        page.get_by_label(LABELS[name], exact=True).fill(str(value))
    page.get_by_role("button", name="Caption").click()


LABELS = {"beam_size": "Beam size", "num_captions": "Captions", "tags": "Tags"}


def api(server: Server, endpoint: str, files: list[tuple[str, tuple[str, bytes]]], **options):
    """What the API answers for the same upload: what the page must show."""
    data = {name: str(value) for name, value in options.items()}
    return httpx.post(f"{server.url}{endpoint}", files=files, data=data, timeout=60).json()


def shown_captions(page: sync_api.Page) -> list[list[str]]:
    return [row.locator("td").all_inner_texts() for row in page.locator("#captions tbody tr").all()]


def test_an_image_gets_its_caption_and_n_best_list(tab, server, artifacts) -> None:
    opened = tab()
    page = opened.page
    ready(opened)
    scene = SAMPLES / "scene.png"
    caption_with(opened, [scene], beam_size=3, num_captions=3)
    sync_api.expect(page.locator("#result")).to_be_visible()
    expected = api(
        server,
        "/v1/captions/image",
        [("image", ("scene.png", scene.read_bytes()))],
        beam_size=3,
        num_captions=3,
    )
    assert page.locator("#caption").inner_text() == expected["caption"]
    assert shown_captions(page) == [
        [str(i + 1), c["text"], f"{c['score']:.3f}", f"{c['log_prob']:.3f}"]
        for i, c in enumerate(expected["captions"])
    ]
    assert page.locator("#preview img").get_attribute("alt") == "Preview of scene.png"
    assert "224 × 224" in page.locator("#input").inner_text()
    timings = page.locator("#timings dt").all_inner_texts()
    assert timings == ["queue", "preprocess", "inference", "total"]
    assert "like the training data" in page.locator("#domain").inner_text()
    assert page.locator("#error").is_hidden()
    page.screenshot(path=artifacts / "image.png", full_page=True)
    if os.environ.get("CAPTIONER_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=SCREENSHOT, full_page=True)
    opened.assert_only_this_server()


def test_a_video_gets_its_description(tab, server, artifacts) -> None:
    opened = tab()
    page = opened.page
    ready(opened)
    video = SAMPLES / "motion.mp4"
    # Dropped on the page rather than picked: the page sees it is a video and says so.
    drop(page, "#drop", video, "video/mp4")
    sync_api.expect(page.get_by_role("radio", name="A video")).to_be_checked()
    sync_api.expect(page.locator("#preview video")).to_have_count(1)
    page.get_by_role("button", name="Caption").click()
    sync_api.expect(page.locator("#result")).to_be_visible()
    expected = api(server, "/v1/captions/video", [("video", ("motion.mp4", video.read_bytes()))])
    assert page.locator("#caption").inner_text() == expected["caption"]
    facts = page.locator("#input").inner_text()
    assert f"frames used\n{expected['input']['frames_used']}" in facts
    assert "codec\nh264" in facts
    page.screenshot(path=artifacts / "video.png", full_page=True)
    opened.assert_only_this_server()


def test_frames_are_sent_in_file_name_order(tab, server) -> None:
    opened = tab()
    page = opened.page
    ready(opened)
    frames = sorted((SAMPLES / "frames").glob("*.png"), reverse=True)  # picked in any order
    caption_with(opened, frames)
    sync_api.expect(page.get_by_role("radio", name="Frames of a clip, in order")).to_be_checked()
    sync_api.expect(page.locator("#result")).to_be_visible()
    ordered = [("frames", (p.name, p.read_bytes())) for p in sorted(frames)]
    expected = api(server, "/v1/captions/video", ordered)
    assert page.locator("#caption").inner_text() == expected["caption"]
    assert page.locator("#preview li span").all_inner_texts() == [p.name for p in sorted(frames)]
    opened.assert_only_this_server()


def test_a_file_that_is_not_an_image_shows_the_apis_error(tab, server, artifacts) -> None:
    opened = tab()
    page = opened.page
    ready(opened)
    notes = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture\n"}
    caption_with(opened, [notes])
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible()
    expected = api(server, "/v1/captions/image", [("image", ("notes.txt", notes["buffer"]))])
    assert error.locator(".message").inner_text() == expected["error"]["message"]
    assert expected["error"]["type"] in error.inner_text()
    assert page.locator("#result").is_hidden()
    page.screenshot(path=artifacts / "error.png", full_page=True)
    opened.assert_only_this_server()


def test_tags_and_the_out_of_domain_warning_are_shown(tab, server, artifacts) -> None:
    data = pytest.importorskip("skimage.data", reason="scikit-image (the dev extra) is missing")
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG")
    photo = {"name": "chelsea.jpg", "mimeType": "image/jpeg", "buffer": buffer.getvalue()}
    opened = tab(viewport=PHONE)
    page = opened.page
    ready(opened)
    caption_with(opened, [photo], tags=3)
    sync_api.expect(page.locator("#result")).to_be_visible()
    expected = api(
        server, "/v1/captions/image", [("image", ("chelsea.jpg", photo["buffer"]))], tags=3
    )
    assert expected["in_domain"] is False
    warning = page.locator("#domain")
    assert "warning" in (warning.get_attribute("class") or "")
    assert warning.locator("li").all_inner_texts() == expected["warnings"]
    assert page.locator("#tags-table tbody td:first-child").all_inner_texts() == [
        tag["name"] for tag in expected["tags"]
    ]
    # Usable at phone width: nothing wider than the screen, so no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=artifacts / "phone.png", full_page=True)
    assert_readable_contrast(page, ["body", ".hint", "a", "button", "#domain p", "th", "#caption"])
    opened.assert_only_this_server()


def test_the_page_says_when_the_model_is_still_loading_and_asks_again(tab) -> None:
    asked = []

    def loading_at_first(route: sync_api.Route) -> None:
        asked.append(route.request.url)
        if len(asked) == 1:  # what a server still loading its model answers
            body = '{"error": {"type": "not_ready", "message": "loading", "param": null}}'
            route.fulfill(status=503, body=body, content_type="application/json")
        else:
            route.continue_()

    opened = tab(before=lambda page: page.route("**/v1/models", loading_at_first))
    model = opened.page.locator("#model")
    sync_api.expect(model).to_have_text("The model is still loading…")
    sync_api.expect(model).to_contain_text("Model captioner-scenes")
    assert len(asked) == 2
    opened.assert_only_this_server()


def test_the_page_works_from_the_keyboard(tab) -> None:
    opened = tab()
    page = opened.page
    ready(opened)
    focused = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.name"))
    # Each control once, in reading order (a radio group is one stop; arrows move within it).
    order = ["kind", "files", "beam_size", "num_captions", "tags", "submit"]
    assert [f for f in focused if f in order][: len(order)] == order, focused
    page.locator('input[name="kind"][value="image"]').focus()
    page.keyboard.press("ArrowRight")
    sync_api.expect(page.get_by_role("radio", name="A video")).to_be_checked()
    sync_api.expect(page.locator("#files-label")).to_have_text("Choose a video")
    opened.assert_only_this_server()


def test_a_server_with_api_keys_gets_its_key_from_the_page(tab, tiny_checkpoint, tmp_path):
    env = {
        "CAPTIONER_MODEL_PATH": str(tiny_checkpoint),
        "CAPTIONER_DEVICE": "cpu",
        "CAPTIONER_TORCH_THREADS": "1",
        "CAPTIONER_API_KEYS": "k-one,k-two",
    }
    with server_process(env, tmp_path / "server.log") as keyed:
        opened = tab(origin=keyed.url)
        page = opened.page
        key = page.get_by_label("API key")
        sync_api.expect(key).to_be_visible()
        sync_api.expect(key).to_be_focused()
        sync_api.expect(page.locator("#model")).to_contain_text("needs an API key")
        key.fill("k-two")
        key.press("Tab")  # a change event: the page asks again, with the key
        sync_api.expect(page.locator("#model")).to_contain_text("Model tiny")
        # The tiny model's CNN has no ImageNet classifier: the page says so.
        sync_api.expect(page.get_by_label("Tags", exact=True)).to_be_disabled()
        caption_with(opened, [SAMPLES / "scene.png"])
        sync_api.expect(page.locator("#result")).to_be_visible()
        assert page.locator("#caption").inner_text()
        key.fill("wrong")
        page.get_by_role("button", name="Caption").click()
        error = page.locator("#error .message")
        sync_api.expect(error).to_have_text("the API key is not valid")
        opened.assert_only_this_server()


def test_the_api_docs_list_the_operations_with_the_network_cut_off(tab, server, artifacts):
    asked, cut = [], []

    def only_this_server(route: sync_api.Route) -> None:
        url = route.request.url
        asked.append(url)
        if url.startswith(server.url + "/"):
            route.continue_()
        else:
            cut.append(url)
            route.abort("internetdisconnected")

    opened = tab("/docs", before=lambda page: page.route("**/*", only_this_server))
    page = opened.page
    image = page.locator('.opblock-post .opblock-summary-path[data-path="/v1/captions/image"]')
    sync_api.expect(image).to_be_visible()
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path, methods in schema["paths"].items():
        for method in methods:
            operation = page.locator(f'.opblock-{method} [data-path="{path}"]')
            sync_api.expect(operation).to_have_count(1)
    page.screenshot(path=artifacts / "docs-offline.png")
    assert cut == [] and any(url.endswith("/openapi.json") for url in asked), (cut, asked)
    opened.assert_only_this_server()


def drop(page: sync_api.Page, target: str, path: Path, mime: str) -> None:
    """Drop a file on an element, as a drag from the desktop does."""
    page.evaluate(
        """([target, name, mime, bytes]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], name, { type: mime }));
            const zone = document.querySelector(target);
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true }));
            }
        }""",
        [target, path.name, mime, list(path.read_bytes())],
    )


def assert_readable_contrast(page: sync_api.Page, selectors: list[str]) -> None:
    """WCAG AA: each element's text against its (first opaque) background is at least 4.5:1."""
    ratios = page.evaluate(
        """(selectors) => {
            const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
            const lum = ([r, g, b]) => {
                const f = (v) => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
                return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
            };
            const background = (node) => {
                for (; node; node = node.parentElement) {
                    const c = rgb(getComputedStyle(node).backgroundColor);
                    if (c.length === 3 || c[3] === 1) return c.slice(0, 3);
                }
                return [255, 255, 255];
            };
            const out = {};
            for (const s of selectors) {
                const node = document.querySelector(s);
                if (!node) { out[s] = null; continue; }
                const [a, b] = [lum(rgb(getComputedStyle(node).color)), lum(background(node))];
                out[s] = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
            }
            return out;
        }""",
        selectors,
    )
    low = {s: r for s, r in ratios.items() if r is None or r < 4.5}
    assert low == {}, low
