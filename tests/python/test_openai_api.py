"""The node through the official `openai` SDK and raw HTTP: chat (stream and not),
completions, models, RAG apps, Dify chat-messages, admin API, errors, limits, metrics,
audit lines. Runs against a real `ragnode serve` with the real SmolLM2 GGUF."""

import gzip
import http.client
import json
import threading
import time
import urllib.parse
import urllib.request

import openai
import pytest

from conftest import ADMIN_KEY, API_KEY, metric, raw, start_node

MODEL = "smollm2"
RETURNS_Q = "退货政策是什么?"


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def sse_events(node, path, body, key=API_KEY):
    """POSTs and parses the SSE stream into JSON payloads ('[DONE]' kept as a string)."""
    u = urllib.parse.urlsplit(node.base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    assert r.getheader("content-type").startswith("text/event-stream")
    out = []
    for line in r:
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    conn.close()
    return out


def audit_lines(node):
    time.sleep(0.3)  # the audit writer flushes asynchronously
    return [json.loads(l) for l in node.audit_log.read_text().splitlines() if l.strip()]


# --- OpenAI API -------------------------------------------------------------------

def test_models_list_names_the_model_and_the_apps(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2", "app:faq"]
    assert client.models.retrieve("app:faq").id == "app:faq"


def test_chat_non_stream_and_stream_with_usage_agree(client):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, user="u-42")
    choice = full.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 10
    assert 0 < full.usage.completion_tokens <= 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage, chunks = "", None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert chunks > 3, "tokens arrive as several chunks"
    assert text == choice.message.content, "greedy stream equals greedy non-stream"
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_sampling_options_stop_seed_penalties_logprobs(client):
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0.9, top_p=0.95,
                                       seed=7, presence_penalty=0.5, frequency_penalty=0.5)
    b = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0.9, top_p=0.95,
                                       seed=7, presence_penalty=0.5, frequency_penalty=0.5)
    assert a.choices[0].message.content == b.choices[0].message.content, "same seed, same text"

    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    text = greedy.choices[0].message.content
    assert "5" in text
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0, stop=["5"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index("5")]

    lp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4


def test_completions_non_stream_and_stream(client):
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert full.choices[0].text
    assert full.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == full.choices[0].text


# --- RAG apps ---------------------------------------------------------------------

def test_app_answers_the_return_policy_citing_its_faq(client, node):
    r = client.chat.completions.create(model="app:faq", messages=[{"role": "user", "content": RETURNS_Q}])
    text = r.choices[0].message.content
    assert "30天" in text
    assert "来源: 退货政策是什么？" in text
    assert r.model_extra["sources"][0]["id"] == "zh-001"

    stream = client.chat.completions.create(model="app:faq", messages=[{"role": "user", "content": "退货政策是什么？"}],
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text
    hits = [l for l in audit_lines(node) if l["app"] == "faq" and l["route"] == "/v1/chat/completions"]
    assert hits[-1]["cache_hit"] is True, "the repeated question came from the hot-answer cache"


def test_app_cache_keeps_only_complete_answers_made_with_the_app_settings(client, node):
    q = [{"role": "user", "content": "退货的运费由谁承担，退款多久到账"}]
    short = client.chat.completions.create(model="app:faq", messages=q, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    again = client.chat.completions.create(model="app:faq", messages=q)
    line = [l for l in audit_lines(node) if l["app"] == "faq"][-1]
    assert line["cache_hit"] is False, "a request with its own max_tokens does not fill the cache"
    assert again.usage.completion_tokens > 2


def test_app_generation_runs_the_model_and_appends_the_source(client):
    # A question the FAQ only partly covers: confidence below the direct-answer bar.
    r = client.chat.completions.create(model="app:faq", max_tokens=40,
                                       messages=[{"role": "user", "content": "退货的时候运费谁来出，要多久才能退款"}])
    text = r.choices[0].message.content
    sources = r.model_extra.get("sources") or []
    assert sources, "retrieval found FAQ entries"
    assert r.usage.completion_tokens > 0, "the model wrote the answer"
    assert text.rstrip().endswith(sources[-1]["question"]), text
    assert "来源: " in text


def test_dify_chat_messages_blocking_streaming_and_conversation(node):
    status, _, body = raw(node, "POST", "/v1/chat-messages",
                          {"query": RETURNS_Q, "inputs": {}, "user": "alice", "response_mode": "blocking"})
    assert status == 200, body
    b = json.loads(body)
    assert "30天" in b["answer"]
    assert b["metadata"]["retriever_resources"][0]["document_id"] == "zh-001"
    conv = b["conversation_id"]
    assert conv and b["message_id"]

    events = sse_events(node, "/v1/chat-messages", {"query": "可以退货吗", "user": "alice",
                                                     "conversation_id": conv, "response_mode": "streaming"})
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "message_end" and "message" in kinds
    assert all(e["conversation_id"] == conv for e in events)
    assert events[-1]["metadata"]["retriever_resources"], "sources in message_end"
    assert "usage" in events[-1]["metadata"]

    status, _, body = raw(node, "POST", "/v1/chat-messages",
                          {"query": "hi", "user": "alice", "conversation_id": "nope", "response_mode": "blocking"})
    assert status == 404 and json.loads(body)["error"]["code"] == "conversation_not_found"
    status, _, body = raw(node, "POST", "/v1/chat-messages", {"query": "hi", "response_mode": "sometimes"})
    assert status == 400


# --- Errors through the SDK ---------------------------------------------------------

def test_sdk_raises_typed_errors(node, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="app:nope", messages=[{"role": "user", "content": "hi"}])
    # The SDK sends no Authorization header at all when told to omit it.
    with pytest.raises(openai.AuthenticationError) as e:
        client.models.list(extra_headers={"Authorization": openai.Omit()})
    assert "didn't provide an API key" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"Authorization": openai.Omit()})
    badkey = openai.OpenAI(base_url=node.base + "/v1", api_key="sk-wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        badkey.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    for kwargs in ({"temperature": 5}, {"top_p": 0}, {"max_tokens": 0}, {"n": 2}, {"presence_penalty": 9},
                   {"top_logprobs": 50, "logprobs": True}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kwargs)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 9000}])
    assert e.value.code == "context_length_exceeded"


# --- Bad input over raw HTTP ------------------------------------------------------

def error_of(status_body):
    status, headers, body = status_body
    assert headers["content-type"].startswith("application/json"), headers
    return status, json.loads(body)["error"]


def test_bad_input_gets_4xx_json_never_5xx(node):
    msgs = [{"role": "user", "content": "hi"}]
    status, err = error_of(raw(node, "POST", "/v1/chat/completions", b'{"model": "smollm2", "messages": [}'))
    assert status == 400 and err["code"] == "invalid_json"
    status, err = error_of(raw(node, "POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 0}))
    assert status == 400 and err["param"] == "max_tokens"
    status, err = error_of(raw(node, "POST", "/v1/chat/completions", {"model": MODEL, "messages": []}))
    assert status == 400 and err["param"] == "messages"
    status, err = error_of(raw(node, "POST", "/v1/chat/completions",
                               {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 9000}]}))
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = error_of(raw(node, "POST", "/v1/chat/completions",
                               b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}'))
    assert status == 400 and err["code"] == "invalid_json"
    status, err = error_of(raw(node, "POST", "/v1/chat/completions", b"x" * (20 << 20)))
    assert status == 413 and err["code"] == "request_too_large"
    status, err = error_of(raw(node, "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}))
    assert status == 400
    status, err = error_of(raw(node, "POST", "/v1/completions", {"model": MODEL, "prompt": ""}))
    assert status == 400
    status, err = error_of(raw(node, "GET", "/v1/nothing-here"))
    assert status == 404
    status, err = error_of(raw(node, "POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": msgs}).encode(),
                               headers={"Content-Type": "text/plain"}))
    assert status == 415, "no simple cross-site POSTs"
    status, err = error_of(raw(node, "POST", "/v1/chat/completions",
                               {"model": "app:faq", "messages": [{"role": "user", "content": "退货" * 2000}]}))
    assert status == 400 and "limit" in err["message"]
    status, err = error_of(raw(node, "POST", "/v1/chat/completions",
                               {"model": "app:faq", "messages": [{"role": "user", "content": "？？？"}]}))
    assert status == 400
    status, err = error_of(raw(node, "GET", "/v1/chat/ws"))
    assert status == 400 and err["code"] == "websocket_required"
    status, err = error_of(raw(node, "POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs}, key=None))
    assert status == 401 and err["type"] == "authentication_error"
    assert node.alive()
    with urllib.request.urlopen(node.base + "/healthz") as r:
        assert r.status == 200


# --- Operations -------------------------------------------------------------------

def test_request_ids_audit_lines_and_gzip(node):
    status, headers, body = raw(node, "GET", "/v1/models", headers={"x-request-id": "req-abc-123",
                                                                    "accept-encoding": "gzip"})
    assert status == 200
    assert headers["x-request-id"] == "req-abc-123"
    assert headers.get("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(body))["object"] == "list"
    status, headers, _ = raw(node, "GET", "/v1/models")
    assert len(headers["x-request-id"]) >= 32, "generated when absent"

    lines = audit_lines(node)
    mine = [l for l in lines if l["request_id"] == "req-abc-123"]
    assert len(mine) == 1 and mine[0]["key_id"] == "tests" and mine[0]["status"] == 200
    chats = [l for l in lines if l["route"] == "/v1/chat/completions" and l["model"] == MODEL and l["status"] == 200]
    assert chats and all(l["prompt_tokens"] > 0 and l["ttft_ms"] is not None for l in chats)
    assert any(l["user"] == "u-42" for l in chats)
    errors = [l for l in lines if l["status"] == 400]
    assert any(l["error_code"] == "context_length_exceeded" for l in errors)
    for l in lines:
        for field in ("request_id", "time", "source_ip", "key_id", "route", "model", "app", "status",
                      "prompt_tokens", "completion_tokens", "ttft_ms", "latency_ms", "cache_hit", "error_code"):
            assert field in l


def test_metrics_and_probes(node, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert metric(node, "ragnode:time_to_first_token_seconds_count") >= 1
    assert metric(node, "ragnode:inter_token_latency_seconds_count") >= 1
    assert metric(node, "ragnode:e2e_request_latency_seconds_count") >= 1
    assert metric(node, "ragnode:prompt_tokens_total") > 0
    assert metric(node, "ragnode:generation_tokens_total") > 0
    assert metric(node, "ragnode:http_requests_total") > 5
    assert metric(node, "ragnode:num_requests_running") == 0
    assert metric(node, "ragnode:num_requests_waiting") == 0
    assert 0 <= metric(node, "ragnode:kv_cache_usage_perc") <= 1
    assert metric(node, "ragnode:retrieval_latency_seconds_count") >= 1
    assert 0 <= metric(node, "ragnode:answer_cache_hit_ratio") <= 1
    with urllib.request.urlopen(node.base + "/readyz") as r:
        ready = json.load(r)
    assert ready["ready"] and ready["model"]["id"] == MODEL


def test_client_disconnect_cancels_generation(node):
    u = urllib.parse.urlsplit(node.base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 3000, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    r = conn.getresponse()
    for _ in range(3):
        r.fp.readline()
    assert metric(node, "ragnode:num_requests_running") == 1
    conn.sock.close()
    conn.close()
    deadline = time.time() + 10
    while metric(node, "ragnode:num_requests_running") != 0:
        assert time.time() < deadline, "generation still running after the client left"
        time.sleep(0.1)

    # Non-streaming: the connection closes while the handler waits for the whole answer.
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(dict(body, stream=False)).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    deadline = time.time() + 10
    while metric(node, "ragnode:num_requests_running") != 1:
        assert time.time() < deadline, "the request never started"
        time.sleep(0.05)
    conn.sock.close()
    deadline = time.time() + 10
    while metric(node, "ragnode:num_requests_running") != 0:
        assert time.time() < deadline, "non-streaming generation still running after the client left"
        time.sleep(0.1)


# --- Admin API ---------------------------------------------------------------------

def test_admin_upsert_search_delete_and_cache_invalidation(node, client):
    entry = {"id": "zh-test-1", "question": "你们支持火星配送吗？", "answer": "目前暂不支持火星配送，敬请期待。",
             "category": "shipping", "lang": "zh"}
    status, _, body = raw(node, "POST", "/v1/admin/faq", {"entries": [entry]}, key=API_KEY)
    assert status == 403, "an API key is not an admin key"
    status, _, body = raw(node, "POST", "/v1/admin/faq", {"entries": [{"id": "x"}]}, key=ADMIN_KEY)
    assert status == 400
    status, _, body = raw(node, "POST", "/v1/admin/faq", {"entries": [entry]}, key=ADMIN_KEY)
    assert status == 200 and json.loads(body)["upserted"] == 1

    r = client.chat.completions.create(model="app:faq", messages=[{"role": "user", "content": "你们支持火星配送吗"}])
    assert "火星" in r.choices[0].message.content and r.model_extra["sources"][0]["id"] == "zh-test-1"

    status, _, body = raw(node, "POST", "/v1/admin/faq/search", {"query": "火星配送", "k": 3}, key=ADMIN_KEY)
    assert status == 200 and json.loads(body)["hits"][0]["id"] == "zh-test-1"
    status, _, body = raw(node, "GET", "/v1/admin/faq/zh-test-1", key=ADMIN_KEY)
    assert status == 200 and json.loads(body)["answer"] == entry["answer"]

    entry["answer"] = "火星配送将于2030年开通。"
    status, _, _ = raw(node, "POST", "/v1/admin/faq", {"entries": [entry]}, key=ADMIN_KEY)
    assert status == 200
    r = client.chat.completions.create(model="app:faq", messages=[{"role": "user", "content": "你们支持火星配送吗"}])
    assert "2030" in r.choices[0].message.content, "a FAQ write invalidates cached answers"

    status, _, _ = raw(node, "DELETE", "/v1/admin/faq/zh-test-1", key=ADMIN_KEY)
    assert status == 200
    status, _, _ = raw(node, "DELETE", "/v1/admin/faq/zh-test-1", key=ADMIN_KEY)
    assert status == 404
    status, _, body = raw(node, "GET", "/v1/admin/faq/stats", key=ADMIN_KEY)
    assert status == 200 and json.loads(body)["num_docs"] == 202


# --- Backpressure --------------------------------------------------------------------

def test_full_queue_answers_429_with_retry_after(tmp_path):
    small = start_node(tmp_path, "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        c = openai.OpenAI(base_url=small.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        outcomes = []

        def one():
            try:
                c.chat.completions.create(model=MODEL, max_tokens=100, temperature=0,
                                          messages=[{"role": "user", "content": "Tell me a long story."}])
                outcomes.append("ok")
            except openai.RateLimitError as e:
                outcomes.append(e)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        limited = [o for o in outcomes if o != "ok"]
        assert outcomes.count("ok") >= 1 and limited, outcomes
        for e in limited:
            assert e.response.headers["retry-after"] == "1"
            assert e.code == "overloaded"
        assert small.alive()
    finally:
        small.proc.terminate()
        small.proc.wait(timeout=20)


def test_requests_past_the_time_limit_end_cleanly(tmp_path):
    slow = start_node(tmp_path, "--request-timeout-secs", "1")
    try:
        body = {"model": MODEL, "max_tokens": 4000, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a very long story about the sea."}]}
        status, err = error_of(raw(slow, "POST", "/v1/chat/completions", body))
        assert status == 504 and err["code"] == "timeout"
        events = sse_events(slow, "/v1/chat/completions", dict(body, stream=True))
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "timeout"
        assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-2])
        deadline = time.time() + 5
        while metric(slow, "ragnode:num_requests_running") != 0:
            assert time.time() < deadline, "the timed-out requests were not cancelled"
            time.sleep(0.1)
        assert slow.alive()
    finally:
        slow.proc.terminate()
        slow.proc.wait(timeout=20)
