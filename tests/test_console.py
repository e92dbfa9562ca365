"""The web console, driven in a real headless Chromium (Debian's `chromium`, through
Playwright for Python) against a real server with an admin token.

Screenshots at each width go to test-artifacts/ (for review); with FAAS_DOCS_SCREENSHOTS=1
they also replace docs/console-*.png, the README's pictures."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.helpers import assert_error, assert_ok, wait_until


REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "console-test-token-5c1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WIDTHS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
XSS = '<script>window.__pwned = 1</script>"><img src=x onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def console_server(faas):
    server = faas.start(store="sqlite", env={"FAAS_TOKEN": TOKEN})
    yield server
    server.stop()
    assert "Traceback" not in server.stderr_text()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed (run: bash tests/install.sh)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


class Page:
    """One browser tab on the console, recording every request it makes and every
    script error or CSP report it sees."""

    def __init__(self, browser, server, viewport=WIDTHS["desktop"]):
        self.server = server
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.requests = []
        self.errors = []
        self.dialogs = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if "Content Security Policy" in m.text else None)
        self.page.on("dialog", self.on_dialog)
        self.answer_dialogs = True

    def on_dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.accept() if self.answer_dialogs else dialog.dismiss()

    def open(self, path="/"):
        self.page.goto(self.server.url + path)
        return self

    def sign_in(self, token=TOKEN):
        self.open()
        self.page.wait_for_selector("#signin:not([hidden])")
        self.page.fill("#token", token)
        self.page.click("#signin-form button[type=submit]")
        if token == TOKEN:
            self.page.wait_for_selector("#view-functions:not([hidden])")
        return self

    def close(self):
        self.context.close()
        assert not self.errors, self.errors


@pytest.fixture
def tab(browser, console_server):
    tab = Page(browser, console_server)
    yield tab
    tab.close()


def upload(server, path, code, language="python"):
    r = server.post("/upload", {"path": path, "language": language, "code": code}, headers=AUTH)
    return assert_ok(r)["version"]


def function(server, path):
    return server.get(f"/functions/{path}", headers=AUTH)


def wait_js(page, expression, timeout=15):
    """page.wait_for_function evaluates its predicate with eval(), which the console's CSP
    forbids: poll with page.evaluate (run by the browser's debugger, not the page) instead."""
    assert wait_until(lambda: page.evaluate(expression), timeout), expression


def log_text(page):
    return page.inner_text("#run-log").rstrip("\n")


def gutter_error(page):
    return page.locator("#gutter div.error").all_inner_texts()


# --------------------------------------------------------------------------- headers and switches

def test_page_headers_and_no_inline_script(console_server):
    for path in ("/", "/console", "/console/"):
        r = console_server.get(path)
        assert r.status == 200, (path, r.status)
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
            assert directive in csp, csp
        assert "unsafe" not in csp, csp
        assert r.headers["x-content-type-options"] == "nosniff"
        html = r.raw.decode()
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
        assert not re.search(r"\son[a-z]+=", html), "inline event handler"
        assert not re.search(r"https?://", html), "a reference outside the server"
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        r = console_server.get(f"/console/{name}")
        assert r.status == 200 and r.headers["content-type"].startswith(kind), (name, r.headers)
        assert r.headers["x-content-type-options"] == "nosniff"
    assert_error(console_server.get("/console/nothing.js"), 404)
    assert_error(console_server.get("/console/..%2ffaas.py"), 404)
    assert_error(console_server.get("/console/../openapi.json"), 404)


def test_console_off_is_404(faas):
    server = faas.start(store="sqlite", env={"FAAS_CONSOLE": "off"})
    try:
        for path in ("/", "/console", "/console/console.js"):
            assert_error(server.get(path), 404)
        assert server.get("/healthz").status == 200
    finally:
        server.stop()


def test_bad_console_switch_stops_the_server(faas):
    server = faas.start(store="sqlite", env={"FAAS_CONSOLE": "maybe"}, wait=False)
    assert server.proc.wait(20) == 2
    assert "FAAS_CONSOLE" in server.stderr_text()


# --------------------------------------------------------------------------- sign-in

def test_refuses_without_the_token(tab):
    tab.open()
    page = tab.page
    page.wait_for_selector("#signin:not([hidden])")
    assert page.is_hidden("#view-functions") and page.is_hidden("#nav")
    tab.sign_in("wrong-token")
    page.wait_for_selector("#signin-error:has-text('refused')")
    assert page.is_hidden("#view-functions")
    assert page.evaluate("sessionStorage.length") == 0
    tab.sign_in()
    assert page.evaluate("sessionStorage.getItem('faas-token')") == TOKEN
    assert tab.context.cookies() == []
    page.click("#sign-out")
    page.wait_for_selector("#signin:not([hidden])")
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    page.wait_for_selector("#signin:not([hidden])")


def test_invoke_token_is_not_enough(browser, faas):
    server = faas.start(store="sqlite", env={"FAAS_TOKEN": TOKEN, "FAAS_INVOKE_TOKEN": "invoke-only-1"})
    tab = Page(browser, server)
    try:
        page = tab.sign_in("invoke-only-1").page
        page.wait_for_selector("#signin-error:has-text('admin token')")
        assert page.is_hidden("#view-functions")
        assert page.evaluate("sessionStorage.length") == 0
        tab.close()
    finally:
        server.stop()


def test_no_sign_in_without_a_configured_token(browser, faas):
    server = faas.start(store="sqlite")
    tab = Page(browser, server)
    try:
        tab.open()
        tab.page.wait_for_selector("#view-functions:not([hidden])")
        assert tab.page.is_hidden("#signin") and tab.page.is_hidden("#sign-out")
        tab.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- the workflow

def test_editor_keeps_indentation(tab):
    page = tab.sign_in().page
    page.click("#new-function")
    page.fill("#code", "")
    page.focus("#code")
    page.keyboard.type("if event:")
    page.keyboard.press("Enter")
    page.keyboard.type("x = 1")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.type("y = 2")
    assert page.input_value("#code") == "if event:\n    x = 1\n        y = 2"
    page.keyboard.press("Shift+Tab")
    assert page.input_value("#code") == "if event:\n    x = 1\n    y = 2"
    assert page.locator("#gutter div").all_inner_texts() == ["1", "2", "3"]
    page.select_option("#language", "javascript")
    page.fill("#code", "")
    page.keyboard.type("{")
    page.keyboard.press("Enter")
    assert page.input_value("#code") == "{\n  "


def test_upload_error_fix_run_rollback_delete(tab, console_server, uid):
    server, page = console_server, tab.sign_in().page
    path = f"{uid}/greet"
    page.click("#new-function")
    page.fill("#path", path)
    page.select_option("#language", "python")
    page.fill("#code", 'import time\nprint("first line")\nvalue = (1,\ntime.sleep(1.5)\nreturn value')
    page.keyboard.press("Control+s")
    page.wait_for_selector("#upload-message.error")
    assert "line 3" in page.inner_text("#upload-message")
    assert gutter_error(page) == ["3"]
    assert function(server, path).status == 404

    page.fill("#code", 'import time\nprint("first line")\ntime.sleep(1.5)\nprint("second line")\n'
                       'return {"n": event.get("n", 0) + 1}')
    assert gutter_error(page) == [], "editing clears the mark"
    page.click("#upload")
    page.wait_for_selector(f"#functions td.path:text-is('{path}')")
    first = assert_ok(function(server, path))
    assert len(first["versions"]) == 1
    page.wait_for_selector("#versions tbody tr")

    # run: the printed line is on the page while the result is still pending
    page.evaluate("""() => {
        window.seen = [];
        const log = document.getElementById('run-log'), result = document.getElementById('run-result');
        new MutationObserver(() => window.seen.push([log.textContent, result.textContent]))
            .observe(document.querySelector('.detail-pane'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", '{"n": 41}')
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#run-result .facts:has-text('status ok')")
    seen = page.evaluate("window.seen")
    while_running = [result for log, result in seen if "first line" in log and "second line" not in log]
    assert while_running and all("status" not in result for result in while_running), seen
    assert log_text(page) == "first line\nsecond line"
    assert json.loads(page.inner_text("#run-result pre")) == {"n": 42}
    facts = page.inner_text("#run-result .facts")
    assert re.search(r"\d+ ms", facts) and f"version {first['latest']}" in facts, facts

    # a second version, then roll back to the first
    page.fill("#code", 'return "two"')
    page.click("#upload")
    page.wait_for_selector("#versions tbody tr:nth-child(2)")
    second = assert_ok(function(server, path))
    assert second["latest"] > first["latest"]
    page.locator("#versions tbody tr", has_text=str(first["latest"])).locator("button", has_text="Set latest").click()
    page.wait_for_selector(f"#upload-message:has-text('{first['latest']} is now the latest')")
    assert assert_ok(function(server, path))["latest"] == first["latest"]
    assert "print(\"first line\")" in page.input_value("#code")
    page.fill("#input", "")
    page.click("#run")
    page.wait_for_selector("#run-result .facts:has-text('status ok')")
    assert json.loads(page.inner_text("#run-result pre")) == {"n": 1}
    assert f"version {first['latest']}" in page.inner_text("#run-result .facts")

    # editing switches the run panel to the code on screen, which runs without being stored
    page.fill("#code", 'print("edited")\nreturn "not stored"')
    assert page.input_value("#target") == "unsaved"
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#run-result .facts:has-text('status ok')")
    assert page.inner_text("#run-result pre") == "not stored" and log_text(page) == "edited"
    assert len(assert_ok(function(server, path))["versions"]) == 2

    # the code of any version
    page.locator("#versions tbody tr", has_text=str(second["latest"])).locator("button", has_text="Code").click()
    wait_js(page, "document.getElementById('code').value === 'return \"two\"'")

    # delete a version: a dismissed confirmation deletes nothing
    tab.answer_dialogs = False
    page.locator("#versions tbody tr", has_text=str(second["latest"])).locator("button", has_text="Delete").click()
    assert tab.dialogs and str(second["latest"]) in tab.dialogs[-1]
    assert len(assert_ok(function(server, path))["versions"]) == 2
    tab.answer_dialogs = True
    page.locator("#versions tbody tr", has_text=str(second["latest"])).locator("button", has_text="Delete").click()
    page.wait_for_selector(f"#upload-message:has-text('Deleted version {second['latest']}')")
    assert [v["version"] for v in assert_ok(function(server, path))["versions"]] == [first["latest"]]

    # delete the function
    page.click("#delete-function")
    page.wait_for_selector(f"#upload-message:has-text('Deleted {path}')")
    assert function(server, path).status == 404
    assert page.locator(f"#functions td.path:text-is('{path}')").count() == 0


def test_run_unsaved_code_and_errors_show_the_line(tab):
    page = tab.sign_in().page
    page.click("#new-function")
    page.select_option("#language", "javascript")
    page.fill("#code", 'console.log("hi");\nconsole.error("warn");\nthrow new Error("boom " + event.x);')
    page.select_option("#target", "unsaved")
    page.fill("#input", '{"x": 7}')
    page.click("#run")
    page.wait_for_selector("#run-result .facts:has-text('status error')")
    assert log_text(page) == "hi\nwarn"
    assert page.locator("#run-log .stderr").inner_text() == "warn\n"
    text = page.inner_text("#run-result pre")
    assert "boom 7" in text and "at line 3" in text, text
    assert gutter_error(page) == ["3"]
    page.fill("#input", "{not json")
    page.click("#run")
    page.wait_for_selector("#run-result pre:has-text('not JSON')")


def test_filter_and_list(tab, console_server, uid):
    for name in ("alpha", "beta"):
        upload(console_server, f"{uid}/{name}", "return 1")
    upload(console_server, f"{uid}/beta", "return 2", "javascript")
    page = tab.sign_in().page
    page.fill("#filter", f"{uid}/")
    wait_js(page, f"document.querySelectorAll('#functions tbody tr').length === 2")
    rows = [row.split("\t") for row in page.locator("#functions tbody tr").all_inner_texts()]
    assert [r[0] for r in rows] == [f"{uid}/alpha", f"{uid}/beta"]
    assert rows[1][1] == "javascript" and rows[1][3] == "2", rows
    page.fill("#filter", f"{uid}/be")
    wait_js(page, "document.querySelectorAll('#functions tbody tr').length === 1")


def test_versions_show_their_settings(tab, console_server, uid):
    r = console_server.post("/upload", {"path": f"{uid}/limited", "language": "python", "code": "return 1",
                                        "timeout": 5, "memory": "64M"}, headers=AUTH)
    version = assert_ok(r)["version"]
    page = tab.sign_in().page
    page.click(f"#functions td.path:text-is('{uid}/limited')")
    row = page.locator("#versions tbody tr", has_text=str(version))
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert "limits: timeout=5, memory=64M" in cells[4], cells
    assert cells[2] == "8 B" and len(cells[3]) == 12, cells


def test_user_data_is_rendered_as_text(tab, console_server, uid):
    path = f"{uid}/x-script-img"
    code = (f"# {XSS}\nprint({XSS!r})\nimport sys\nprint({XSS!r}, file=sys.stderr)\n"
            f"return {{{XSS!r}: {XSS!r}}}")
    upload(console_server, path, code)
    failing = f"{uid}/x-raise"
    upload(console_server, failing, f"raise ValueError({XSS!r})")
    page = tab.sign_in().page
    page.click(f"#functions td.path:text-is('{path}')")
    wait_js(page, "document.getElementById('code').value.includes('<script>')")
    page.click("#run")
    page.wait_for_selector("#run-result .facts:has-text('status ok')")
    assert log_text(page) == f"{XSS}\n{XSS}"
    assert json.loads(page.inner_text("#run-result pre")) == {XSS: XSS}
    page.click(f"#functions td.path:text-is('{failing}')")
    wait_js(page, "document.getElementById('code').value.startsWith('raise')")
    page.click("#run")
    page.wait_for_selector("#run-result .facts:has-text('status error')")
    assert XSS in page.inner_text("#run-result pre")
    # a path with markup is refused by the server; the refusal is shown as text
    page.click("#new-function")
    page.fill("#path", XSS)
    page.fill("#code", "return 1")
    page.click("#upload")
    page.wait_for_selector("#upload-message.error")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 1


def test_health_and_calls_feature_detection(tab, console_server, uid):
    upload(console_server, f"{uid}/h", "return 1")
    for _ in range(3):
        assert_ok(console_server.post(f"/run/{uid}/h", {}, headers=AUTH))
    page = tab.sign_in().page
    page.click("[data-view=health]")
    page.wait_for_selector(f"#per-function td.path:text-is('{uid}/h')")
    row = page.locator("#per-function tr", has_text=f"{uid}/h")
    assert "ok 3" in row.inner_text()
    assert re.search(r"\d ms", row.locator("td").nth(2).inner_text())
    assert row.locator("canvas.spark").count() == 1
    drawn = row.locator("canvas.spark").evaluate(
        "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0)")
    assert drawn, "the sparkline is drawn"
    assert page.inner_text("#health-badge") == "ok"
    assert "runs in flight" in page.inner_text("#health")
    assert console_server.get("/calls", headers=AUTH).status == 200
    assert page.is_visible("[data-view=calls]"), "this server keeps call records"


def submit(server, path, body=None):
    """An asynchronous call: 202 with its id."""
    r = server.post(f"/run/{path}?async=1", body or {}, headers=AUTH)
    assert r.status == 202, (r.status, r.body)
    return r.body["id"]


def call_row(page, call_id):
    return page.locator(f"#calls tbody tr[data-id='{call_id}']")


def test_calls_panel_lists_records_and_shows_them_as_text(tab, console_server, uid):
    path, failing = f"{uid}/x-async", f"{uid}/async-fail"
    upload(console_server, path, f"import sys\nprint({XSS!r})\nprint('to stderr', file=sys.stderr)\n"
                                 f"return {{'echo': event, {XSS!r}: 1}}")
    upload(console_server, failing, "print('before')\nraise ValueError('async boom')")
    ok_id = submit(console_server, path, {"input": {"n": 5}})
    fail_id = submit(console_server, failing)
    for call_id in (ok_id, fail_id):
        record = assert_ok(console_server.get(f"/calls/{call_id}?wait=30", headers=AUTH))
        assert record["status"] in ("ok", "error"), record

    page = tab.sign_in().page
    assert page.is_visible("[data-view=calls]")
    page.click("[data-view=calls]")
    call_row(page, ok_id).wait_for()
    cells = call_row(page, ok_id).locator("td").all_inner_texts()
    assert cells[0] == ok_id[:12] and cells[1] == path and cells[2] == "ok", cells
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[3]), cells
    assert call_row(page, fail_id).locator("td").nth(2).inner_text() == "error"

    call_row(page, ok_id).click()
    page.wait_for_selector("#call-result .facts:has-text('status ok')")
    assert ok_id in page.inner_text("#call-head") and path in page.inner_text("#call-head")
    assert page.inner_text("#call-log").rstrip("\n") == f"{XSS}\nto stderr"
    assert page.locator("#call-log .stderr").inner_text() == "to stderr\n"
    assert json.loads(page.inner_text("#call-result pre")) == {"echo": {"n": 5}, XSS: 1}

    call_row(page, fail_id).click()
    page.wait_for_selector("#call-result .facts:has-text('status error')")
    assert page.inner_text("#call-log").rstrip("\n") == "before"
    text = page.inner_text("#call-result pre")
    assert "async boom" in text and "at line 2" in text, text

    page.select_option("#calls-status", "error")
    wait_js(page, f"!document.querySelector(\"#calls tbody tr[data-id='{ok_id}']\")")
    assert call_row(page, fail_id).count() == 1
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0 and page.locator("script").count() == 1


def test_calls_panel_follows_a_running_call_to_its_end(tab, console_server, uid):
    path = f"{uid}/async-slow"
    upload(console_server, path, "import time\nprint('started', flush=True)\ntime.sleep(4)\nprint('done')\nreturn 7")
    call_id = submit(console_server, path)
    running = lambda: console_server.get(f"/calls/{call_id}", headers=AUTH).body["status"] == "running"
    assert wait_until(running, 30), "the call started"
    page = tab.sign_in().page
    page.click("[data-view=calls]")
    call_row(page, call_id).wait_for()
    assert call_row(page, call_id).locator("td").nth(2).inner_text() == "running"
    page.evaluate("""() => {
        window.seen = [];
        const log = document.getElementById('call-log'), result = document.getElementById('call-result');
        new MutationObserver(() => window.seen.push([log.textContent, result.textContent]))
            .observe(document.getElementById('view-calls'), {childList: true, subtree: true, characterData: true});
    }""")
    call_row(page, call_id).click()
    page.wait_for_selector("#call-result .facts:has-text('status ok')", timeout=60_000)
    assert page.inner_text("#call-log").rstrip("\n") == "started\ndone"
    assert page.inner_text("#call-result pre") == "7"
    seen = page.evaluate("window.seen")
    while_running = [result for log, result in seen if "started" in log and "done" not in log]
    assert while_running and all("status ok" not in result for result in while_running), seen
    wait_js(page, f"document.querySelector(\"#calls tbody tr[data-id='{call_id}'] td:nth-child(3)\").textContent === 'ok'")


# --------------------------------------------------------------------------- cost, foreign requests, widths

def test_no_request_leaves_the_server_and_the_page_is_small(tab, console_server, uid):
    upload(console_server, f"{uid}/cost", "return 1")
    sizes = []
    tab.page.on("response", lambda r: sizes.append((r.url, len(r.body()) if r.ok else 0)))
    tab.sign_in()
    page = tab.page
    page.click(f"#functions td.path:text-is('{uid}/cost')")
    page.click("#run")
    page.wait_for_selector("#run-result .facts:has-text('status ok')")
    page.click("[data-view=health]")
    page.wait_for_selector("#per-function tbody tr")
    assert tab.requests and all(url.startswith(console_server.url + "/") for url in tab.requests), tab.requests
    static = [(url, n) for url, n in sizes if re.search(r"/(console/[a-z.]+)?$", url.split("?")[0])]
    total = sum(n for _, n in static)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "console-cost.txt").write_text(
        f"page load: {len(static)} requests, {total} bytes (uncompressed)\n"
        + "".join(f"{n:>8}  {url}\n" for url, n in static))
    assert total < 64 * 1024, static


@pytest.fixture(scope="module")
def showcase_server(faas):
    """A server holding only a few example functions: what the README's pictures show."""
    server = faas.start(store="sqlite", env={"FAAS_TOKEN": TOKEN})
    upload(server, "examples/hello", 'print("hello from the sandbox")\n'
                                     'return {"greeting": "hi " + event.get("name", "you")}')
    upload(server, "examples/hello", 'import time\nfor i in range(3):\n    print("step", i)\n    time.sleep(0.1)\n'
                                     'return {"greeting": "hi " + event.get("name", "you")}')
    upload(server, "examples/math/add", "return event.get('a', 0) + event.get('b', 0)")
    upload(server, "examples/shout", "return String(event.text || '').toUpperCase()", "javascript")
    yield server
    server.stop()


@pytest.mark.parametrize("name", list(WIDTHS))
def test_works_at_each_width_with_screenshots(browser, showcase_server, name):
    tab = Page(browser, showcase_server, WIDTHS[name])
    page = tab.sign_in().page
    page.click("#functions td.path:text-is('examples/hello')")
    page.fill("#input", '{"name": "ada"}')
    page.click("#run")
    page.wait_for_selector("#run-result .facts:has-text('status ok')")
    assert log_text(page) == "step 0\nstep 1\nstep 2"
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a {name} window"
    for selector in ("#code", "#run", "#upload", "#functions", "#versions-box"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= WIDTHS[name]["width"], (selector, box)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"console-{name}.png"
    page.screenshot(path=str(shot), full_page=name == "phone")
    assert shot.stat().st_size > 10_000
    if os.environ.get("FAAS_DOCS_SCREENSHOTS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / shot.name)
    page.click("[data-view=health]")
    page.wait_for_selector("#per-function td.path:text-is('examples/hello')")
    page.screenshot(path=str(ARTIFACTS / f"console-health-{name}.png"), full_page=True)
    tab.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="faas.py install needs root (and mounts here)")
def test_install_copies_the_console(tmp_path):
    """`faas.py install --prefix` copies console/ with faas.py. It runs in its own mount
    namespace with an overlay on /etc and no /run/systemd, so the host is not touched."""
    prefix, upper, work = tmp_path / "opt", tmp_path / "etc-upper", tmp_path / "etc-work"
    upper.mkdir()
    work.mkdir()
    script = (f"set -e; mount --make-rprivate /; "
              f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc; "
              f"if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; fi; "
              f"exec {sys.executable} {REPO / 'faas.py'} install --prefix {prefix}")
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"-> {prefix / 'console'}" in done.stdout
    for file in (REPO / "console").iterdir():
        assert (prefix / "console" / file.name).read_bytes() == file.read_bytes()
    assert (upper / "systemd/system/faas.service").is_file(), "the unit went to the overlay, not the host"


def test_csp_blocks_requests_to_other_origins(tab):
    """A script in the page (as injected code would be) cannot reach another origin: the
    CSP refuses before any packet leaves (the address is loopback anyway, should it not)."""
    page = tab.sign_in().page
    violations = page.evaluate("""async () => {
        const seen = [];
        document.addEventListener('securitypolicyviolation', e => seen.push(e.effectiveDirective));
        let failed = false;
        try { await fetch('http://127.0.0.2:9/steal'); } catch (e) { failed = true; }
        const img = new Image(); img.src = 'http://127.0.0.2:9/pixel.png';
        await new Promise(resolve => setTimeout(resolve, 300));
        return {seen, failed};
    }""")
    assert violations["failed"] and set(violations["seen"]) == {"connect-src", "img-src"}, violations
    tab.errors = [e for e in tab.errors if "127.0.0.2" not in e]
