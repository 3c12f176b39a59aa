"""The web chat page in headless Chromium (Debian's `chromium`), driven over the Chrome
DevTools Protocol: load `/`, ask "退货政策是什么?", wait for the streamed answer and its
source, keep a screenshot in the test artefacts (target/test-artifacts/chat-page.png)."""

import base64
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.request

from websockets.sync.client import connect

from conftest import API_KEY, artifacts_dir


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("chromium is not installed (.ci/run installs Debian's `chromium`)")


class Cdp:
    """A minimal Chrome DevTools Protocol session on one page."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")


def test_chat_page_streams_the_answer_and_its_source(node):
    profile = pathlib.Path(tempfile.mkdtemp(prefix="ragnode-chromium-"))
    proc = subprocess.Popen(
        [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=1000,800", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited"
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=64 << 20, open_timeout=30) as ws:
            drive_page(Cdp(ws), node)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def drive_page(cdp, node):
    """Asks two questions on the page; keeps a screenshot."""
    cdp.call("Page.enable")
    cdp.call("Runtime.enable")
    # The node needs a key: the page keeps it in localStorage, as a user would enter it.
    # Page.navigate returns before the new document exists: each wait names the page's
    # origin and tolerates a document that has no body yet (else it may run on the old one).
    loaded = f"location.href.startsWith({json.dumps(node.base)}) && document.readyState === 'complete'"
    cdp.call("Page.navigate", url=node.base + "/")
    wait_for(cdp, loaded)
    # Without a key the page says that the server wants one (not just "disconnected").
    wait_for(cdp, loaded + " && (document.getElementById('status')?.textContent || '').includes('needs an API key')")
    cdp.eval(f"localStorage.setItem('ragnode_api_key', {json.dumps(API_KEY)})")
    cdp.call("Page.navigate", url=node.base + "/")
    wait_for(cdp, loaded + " && document.getElementById('status')?.textContent === 'connected'")

    cdp.eval("""(() => {
        const q = document.getElementById('question');
        q.value = '退货政策是什么?';
        document.getElementById('send').click();
    })()""")
    wait_for(cdp, "document.querySelector('.msg.assistant[data-done=\"1\"]') !== null", timeout=60)
    answer = cdp.eval("document.querySelector('.msg.assistant .text').textContent")
    sources = cdp.eval("[...document.querySelectorAll('.msg.assistant .sources li')].map(li => li.textContent)")
    errors = cdp.eval("document.querySelectorAll('.msg.assistant.error').length")

    # A question the FAQ covers only in part: the model writes the answer, token by token.
    cdp.eval("""(() => {
        document.getElementById('question').value = '退货的时候运费谁来出，要多久才能退款';
        document.getElementById('send').click();
    })()""")
    wait_for(cdp, "document.querySelectorAll('.msg.assistant[data-done=\"1\"]').length === 2", timeout=90)
    second = cdp.eval("""(() => {
        const box = document.querySelectorAll('.msg.assistant')[1];
        return { text: box.querySelector('.text').textContent, deltas: Number(box.dataset.deltas || 0),
                 sources: box.querySelectorAll('.sources li').length, error: box.classList.contains('error') };
    })()""")

    shot = cdp.call("Page.captureScreenshot", format="png")
    out = artifacts_dir() / "chat-page.png"
    out.write_bytes(base64.b64decode(shot["data"]))
    assert out.stat().st_size > 5000

    assert errors == 0
    assert "30天" in answer, answer
    assert "来源: 退货政策是什么？" in answer, answer
    assert sources and "退货政策是什么？" in sources[0] and "zh-001" in sources[0], sources
    assert not second["error"] and second["deltas"] > 5, second
    assert second["sources"] >= 1 and "来源: " in second["text"], second


def wait_for(cdp, expr, timeout=30):
    deadline = time.time() + timeout
    while not cdp.eval(expr):
        assert time.time() < deadline, f"timed out waiting for {expr}"
        time.sleep(0.1)
