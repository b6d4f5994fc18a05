"""The page at ``/`` over HTTP: served by the app, self-contained, outside the API key, labelled
in metrics by route. tests/test_web.py drives it in Chromium."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.page import FILES
from tests.app_support import tiny_client

ROOT = Path(__file__).resolve().parents[1]


class Links(HTMLParser):
    """Every src/href of a page, and the labels and controls of its form."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.controls: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()
        self.in_label = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "label":
            self.in_label += 1
            if found.get("for"):
                self.label_for.add(found["for"] or "")
        elif tag in ("input", "select", "textarea"):
            self.controls.append(found | {"wrapped": "yes" if self.in_label else None})

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self.in_label -= 1


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    with tiny_client(tiny_checkpoint) as client:
        yield client


def parse(html: str) -> Links:
    links = Links()
    links.feed(html)
    return links


def test_the_page_is_served_at_the_root(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>captioner" in page.text and 'href="docs"' in page.text


def test_the_page_and_its_assets_come_from_this_server_only(client) -> None:
    links = parse(client.get("/").text)
    assert set(links.urls) == {
        "static/favicon.svg",
        "static/page.css",
        "static/page.js",
        "docs",
    }
    for url in links.urls:
        assert client.get(f"/{url}").status_code == 200, url
    # No absolute URL anywhere: no CDN, no web font, no analytics; fetches are relative too.
    for name in ("index.html", "page.css", "page.js"):
        text = (FILES / name).read_text()
        assert not re.search(r"https?:|//[a-z]", text, flags=re.I), name
        assert "@import" not in text and "url(" not in text, name
    assert re.findall(r'fetch\("([^"]+)"', (FILES / "page.js").read_text()) == ["v1/models"]


def test_every_control_has_a_label(client) -> None:
    links = parse(client.get("/").text)
    assert links.controls
    for control in links.controls:
        labelled = control.get("wrapped") or control.get("id") in links.label_for
        assert labelled, control


def test_the_page_opens_without_an_api_key_when_the_api_needs_one(tiny_checkpoint) -> None:
    with tiny_client(tiny_checkpoint, api_keys=["k1"]) as client:
        assert client.get("/v1/models").status_code == 401
        for path in ("/", "/static/page.js", "/static/page.css", "/docs"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_the_page_is_not_part_of_the_api_schema(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def requests_by_label(client) -> Counter[tuple[str, str]]:
    (family,) = [
        f
        for f in text_string_to_metric_families(client.get("/metrics").text)
        if f.name == "captioner_requests"
    ]
    return Counter(
        {
            (s.labels["endpoint"], s.labels["status"]): s.value
            for s in family.samples
            if s.name == "captioner_requests_total"
        }
    )


def test_the_page_and_its_files_get_one_metrics_label_each(client) -> None:
    before = requests_by_label(client)
    for path in ("/", "/static/page.js", "/static/page.css", "/static/missing.js"):
        client.get(path)
    after = requests_by_label(client)
    after.subtract(before)
    after[("/metrics", "200")] -= 1  # the first look
    assert +after == {("/", "200"): 1, ("/static", "200"): 2, ("/static", "404"): 1}


def test_the_page_files_are_in_the_package() -> None:
    """A wheel (the Docker image installs one) carries what pyproject's package-data lists."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["app"]
    for path in FILES.iterdir():
        name = path.relative_to(ROOT / "app").as_posix()
        assert any(fnmatch.fnmatch(name, glob) for glob in globs), name
