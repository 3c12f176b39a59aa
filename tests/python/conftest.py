"""Starts one real `ragnode serve` process for the Python black-box tests.

The node serves the real SmolLM2 GGUF and the demo FAQ (seeded into a fresh index), with
an API key and an admin key, on a free loopback port. The binary is the one
`scripts/test.sh` built (`$RAGNODE_BIN`, default target/ci/ragnode under
`$CARGO_TARGET_DIR`).
"""

import http.client
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
API_KEY = "sk-test-0123456789"
ADMIN_KEY = "sk-admin-0123456789"


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RAGNODE_CACHE", pathlib.Path.home() / ".cache" / "ragnode"))


def ragnode_bin() -> pathlib.Path:
    if "RAGNODE_BIN" in os.environ:
        return pathlib.Path(os.environ["RAGNODE_BIN"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "ci" / "ragnode"


def artifacts_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("RAGNODE_ARTIFACTS", ROOT / "target" / "test-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class Node:
    def __init__(self, proc, base, workdir):
        self.proc = proc
        self.base = base  # http://127.0.0.1:PORT
        self.workdir = workdir

    @property
    def audit_log(self) -> pathlib.Path:
        return self.workdir / "audit.jsonl"

    def alive(self) -> bool:
        return self.proc.poll() is None


def raw(node, method, path, body=None, headers=None, key=API_KEY, timeout=120):
    """One HTTP request to `node`; returns (status, headers lowercased, body bytes)."""
    u = urllib.parse.urlsplit(node.base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


def metric(node, name):
    """Sum of all series of a metric in /metrics (no key needed)."""
    with urllib.request.urlopen(node.base + "/metrics") as r:
        text = r.read().decode()
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    assert seen, f"{name} not in /metrics"
    return total


def start_node(workdir: pathlib.Path, *extra: str) -> Node:
    binary = ragnode_bin()
    model = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert binary.exists(), f"{binary} is missing: run scripts/test.sh (it builds it)"
    assert model.exists(), f"{model} is missing: run scripts/fetch-test-data.sh"
    args = [
        str(binary), "serve",
        "--model", str(model),
        "--served-model-name", "smollm2",
        "--faq-index", str(workdir / "index"),
        "--faq-seed", str(ROOT / "data" / "faq-demo.jsonl"),
        "--listen", "127.0.0.1:0",
        "--api-key", f"tests={API_KEY}",
        "--admin-key", f"ops={ADMIN_KEY}",
        "--audit-log", str(workdir / "audit.jsonl"),
        "--max-body-bytes", str(4 << 20),
        "--ws-ping-interval-secs", "1",
        "--threads", "2",
        *extra,
    ]
    log = open(workdir / "node.log", "w")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = None
    deadline = time.time() + 120
    # The node prints "ragnode listening on http://ADDR", then "ragnode ready: ...".
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"ragnode exited ({proc.wait()}) before it was ready; see {workdir}/node.log")
        log.write(line)
        log.flush()
        if line.startswith("ragnode listening on "):
            base = line.split()[-1].strip()
        if line.startswith("ragnode ready"):
            break
    else:
        proc.kill()
        raise RuntimeError("ragnode did not become ready in 120 s")
    # Keep draining stderr into the log so the pipe never fills.
    def drain():
        for line in proc.stderr:
            log.write(line)
            log.flush()
    import threading
    threading.Thread(target=drain, daemon=True).start()
    with urllib.request.urlopen(base + "/readyz") as r:
        assert json.load(r)["ready"] is True
    return Node(proc, base, workdir)


@pytest.fixture(scope="session")
def node():
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="ragnode-pytest-"))
    n = start_node(workdir)
    yield n
    alive = n.alive()
    n.proc.terminate()
    try:
        n.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        n.proc.kill()
    shutil.copy(workdir / "node.log", artifacts_dir() / "node.log")
    if n.audit_log.exists():
        shutil.copy(n.audit_log, artifacts_dir() / "audit.jsonl")
    shutil.rmtree(workdir, ignore_errors=True)
    assert alive, "the node died during the tests"
