"""/api/docs: the published document as a page for people, from our own templates."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from scheduler_site.openapi import document
from tests.browser import PHONE, chromium_page, page_overflow


@pytest.mark.django_db
def test_the_docs_page_shows_every_endpoint_and_schema_without_logging_in():
    response = Client().get("/api/docs")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert '<header class="topbar">' in html  # templates/base.html
    assert 'href="/api/openapi.json"' in html
    doc = document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert f'id="{op["operationId"]}"' in html
            assert f"<code>{method.upper()} {path}</code>" in html
    for name in doc["components"]["schemas"]:
        assert f'id="schema-{name}"' in html
    assert "task_deleted" in html and "cancel_requested_by" in html
    # The descriptions' Markdown-style `code` reads as code, not as backticks.
    assert "<code>Authorization: Bearer &lt;token&gt;</code>" in html
    assert "`" not in re.sub(r"<pre.*?</pre>", "", html, flags=re.S)
    # Nothing from a CDN: every script and stylesheet is ours.
    for url in re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html):
        assert url.startswith("/static/"), url


@pytest.mark.django_db
def test_every_table_of_the_docs_page_scrolls_in_its_own_box():
    html = Client().get("/api/docs").content.decode()

    tables = html.count("<table")
    assert tables > 20
    assert len(re.findall(r'<div class="table-scroll">\s*<table', html)) == tables


@pytest.mark.e2e
@pytest.mark.browser
def test_the_docs_page_fits_a_phone_without_sideways_scrolling(master):
    with chromium_page(PHONE, name="api-docs-phone") as page:
        page.goto(f"{master.url}/api/docs")
        page.click("summary")  # open one schema's JSON: a wide pre scrolls in its box

        assert page.locator("h1").inner_text().startswith("Scheduler API")
        assert page_overflow(page) == 0
