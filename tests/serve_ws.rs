//! The WebSocket chat (`GET /v1/chat/ws`) of a real `ragnode serve` process: two
//! requests in flight on one socket, one cancelled; server pings; a client that stops
//! answering pings is closed; bad frames get error events or a close; no key, no socket.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ragnode_tests::ServeProcess;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "sk-ws-test-123456";

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(node: &ServeProcess) -> Ws {
    let url = format!("ws://{}/v1/chat/ws?api_key={KEY}", node.addr);
    tokio_tungstenite::connect_async(url).await.expect("websocket handshake").0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

fn node() -> ServeProcess {
    ServeProcess::start(&["--api-key", KEY, "--ws-ping-interval-secs", "1", "--served-model-name", "smollm2"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_requests_stream_concurrently_one_is_cancelled_and_pings_arrive() {
    let node = node();
    let mut ws = connect(&node).await;
    let started = Instant::now();
    send(
        &mut ws,
        json!({"type": "chat", "id": "long", "model": "smollm2", "max_tokens": 3000, "temperature": 0,
               "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "chat", "id": "short", "model": "smollm2", "max_tokens": 12, "temperature": 0,
               "messages": [{"role": "user", "content": "Say hello."}]}),
    )
    .await;
    send(&mut ws, json!({"type": "chat", "id": "faq", "query": "退货政策是什么?"})).await;

    let mut text: HashMap<String, String> = HashMap::new();
    let mut done: HashMap<String, Value> = HashMap::new();
    let mut order = Vec::new();
    let mut pings = 0;
    let mut cancel_sent = false;
    let mut long_after_short = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while done.len() < 3 {
        assert!(Instant::now() < deadline, "timed out; done so far: {done:?}");
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("a frame").expect("open");
        match msg.expect("frame") {
            Message::Ping(_) => pings += 1,
            Message::Text(t) => {
                let ev: Value = serde_json::from_str(t.as_str()).expect("JSON event");
                let id = ev["id"].as_str().expect("id").to_string();
                match ev["type"].as_str() {
                    Some("delta") => {
                        text.entry(id.clone()).or_default().push_str(ev["text"].as_str().unwrap());
                        if id == "long" && done.contains_key("short") {
                            long_after_short += 1;
                        }
                        order.push(id);
                    }
                    Some("done") => {
                        done.insert(id, ev);
                    }
                    other => panic!("unexpected event {other:?}: {ev}"),
                }
            }
            other => panic!("unexpected frame {other:?}"),
        }
        // Once the short request is finished and the long one has streamed on after it,
        // cancel the long one (after a ping or two have had time to arrive).
        if !cancel_sent && long_after_short >= 3 && started.elapsed() > Duration::from_millis(1500) {
            assert!(text.get("long").is_some_and(|t| !t.is_empty()), "the long request streams");
            send(&mut ws, json!({"type": "cancel", "id": "long"})).await;
            cancel_sent = true;
        }
    }
    // Both model requests streamed at the same time: their deltas interleave.
    let last_short = order.iter().rposition(|i| i == "short").unwrap();
    assert!(order[..last_short].iter().any(|i| i == "long"), "the long request streamed before the short one ended");
    assert!(order[last_short..].iter().any(|i| i == "long"), "the long request kept streaming after the short one");

    assert_eq!(done["long"]["finish_reason"], "cancelled");
    let short = &done["short"];
    assert!(["stop", "length"].contains(&short["finish_reason"].as_str().unwrap()));
    assert!(short["usage"]["completion_tokens"].as_u64().unwrap() <= 12);
    assert!(!text["short"].is_empty());
    let faq = &done["faq"];
    assert_eq!(faq["sources"][0]["id"], "zh-001");
    assert!(text["faq"].contains("30天") && text["faq"].contains("来源: 退货政策是什么？"));
    assert!(pings >= 1, "server pings every second");

    // A cancelled id may be reused at once: the new request runs to its end (it is not
    // taken for the old one when that one's cancellation completes).
    let long = json!({"type": "chat", "id": "again", "model": "smollm2", "max_tokens": 3000, "temperature": 0,
                      "messages": [{"role": "user", "content": "Write a long story about the sea."}]});
    send(&mut ws, long).await;
    let mut dones = Vec::new();
    let mut reused = false;
    while dones.len() < 2 {
        let Message::Text(t) = ws.next().await.expect("open").expect("frame") else { continue };
        let ev: Value = serde_json::from_str(t.as_str()).unwrap();
        assert_eq!(ev["id"], "again", "{ev}");
        match ev["type"].as_str() {
            Some("delta") if !reused => {
                send(&mut ws, json!({"type": "cancel", "id": "again"})).await;
                send(
                    &mut ws,
                    json!({"type": "chat", "id": "again", "model": "smollm2", "max_tokens": 8,
                                     "messages": [{"role": "user", "content": "Say hi."}]}),
                )
                .await;
                reused = true;
            }
            Some("done") => dones.push(ev["finish_reason"].as_str().unwrap().to_string()),
            Some("delta") => {}
            _ => panic!("unexpected {ev}"),
        }
    }
    assert_eq!(dones[0], "cancelled");
    assert!(["stop", "length"].contains(&dones[1].as_str()), "{dones:?}");

    // A bad message gets an error event; the socket stays usable.
    ws.send(Message::text("{not json")).await.unwrap();
    send(&mut ws, json!({"type": "chat", "id": "m", "model": "nope", "messages": [{"role": "user", "content": "x"}]}))
        .await;
    send(&mut ws, json!({"type": "chat", "id": "z", "model": "smollm2", "max_tokens": 0, "messages": []})).await;
    let mut codes = Vec::new();
    while codes.len() < 3 {
        match ws.next().await.expect("open").expect("frame") {
            Message::Text(t) => {
                let ev: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(ev["type"], "error", "{ev}");
                codes.push(ev["code"].as_str().unwrap().to_string());
            }
            Message::Ping(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    // Requests run as separate tasks: their answers may come in any order.
    codes.sort();
    assert_eq!(codes, ["invalid_message", "invalid_value", "model_not_found"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_oversized_frames_and_missing_keys_are_refused() {
    let node = node();

    // A client that never reads (so never answers pings) is closed after two missed pongs.
    let mut ws = connect(&node).await;
    tokio::time::sleep(Duration::from_millis(3600)).await;
    let mut closed = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                closed = true;
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Err(_) => break,
        }
    }
    assert!(closed, "the server closes a socket that misses its pongs");

    // A frame over the size limit closes the socket.
    let mut ws = connect(&node).await;
    let big = format!("{{\"type\":\"chat\",\"id\":\"b\",\"query\":\"{}\"}}", "x".repeat(300 << 10));
    let _ = ws.send(Message::text(big)).await;
    let mut closed = false;
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match frame {
            Ok(Message::Close(_)) | Err(_) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    let closed = closed || ws.next().await.is_none();
    assert!(closed, "an oversized frame closes the socket");

    // No key: the handshake is refused with 401.
    let url = format!("ws://{}/v1/chat/ws", node.addr);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
}
