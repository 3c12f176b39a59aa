//! `ragnode serve`: the engine and the FAQ shard behind one axum server.
//!
//! Layout follows the TGI router / axum examples: validation at the edge (each front end
//! parses and checks its own wire format), one shared [`state::AppState`], small
//! handlers; backpressure is a 429 from the engine's bounded queue, not a timeout.
//!
//! | route | module |
//! |---|---|
//! | `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` | [`openai`] |
//! | `POST /v1/chat-messages` (Dify) | [`dify`] |
//! | `GET /v1/chat/ws` | [`ws`] |
//! | `POST /tokenize`, `POST /detokenize` | [`tokenize`] |
//! | `/v1/admin/faq...` | [`admin`] |
//! | `/`, `/healthz`, `/readyz`, `/metrics` | here |
//!
//! The listener is bound before the model loads, so probes answer at once: `/readyz` is
//! 503 until the model runs and the FAQ index is open.

pub mod admin;
pub mod answer;
pub mod audit;
pub mod auth;
pub mod coalesce;
pub mod dify;
pub mod error;
pub mod extract;
pub mod faqindex;
pub mod listener;
pub mod metrics;
pub mod openai;
pub mod rag;
pub mod reasoning;
pub mod routing;
pub mod state;
pub mod tokenize;
pub mod ws;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use candle_core::Device;
use ragnode_inference::{Engine, EngineConfig};
use ragnode_models::{LoadOptions, load_model};
use ragnode_retrieval::ingest::{FieldMapping, Format, IngestOptions, ingest_file};
use ragnode_retrieval::{FaqShard, ShardConfig};
use serde_json::json;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::config::ServeConfig;
use error::ApiError;
use rag::{ConversationStore, RagApp};
use state::{AppState, SharedState};

const INDEX_HTML: &str = include_str!("../../web/index.html");

/// File descriptors the node needs beside its connections: model and index files
/// (tantivy keeps a few per segment), logs, NATS, the runtime's own.
const RESERVED_FDS: u64 = 512;

/// Runs the server until Ctrl-C / SIGTERM.
pub fn run(cfg: ServeConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ragnode-http")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: ServeConfig) -> Result<()> {
    let prometheus = metrics::install()?;
    let mut apps = HashMap::new();
    for app in &cfg.apps {
        apps.insert(app.name.clone(), Arc::new(RagApp::new(app.clone()).map_err(anyhow::Error::msg)?));
    }
    let model_spec = match (&cfg.model, &cfg.dummy_weights) {
        (Some(m), _) => m.clone(),
        (None, Some(config)) => config.display().to_string(),
        (None, None) => anyhow::bail!("no model configured"),
    };
    // Before binding anything: a device this build or machine cannot open is a start error.
    let device = cfg.device.open().context("opening the compute device")?;
    let model_id = cfg.served_model_name.clone().unwrap_or_else(|| default_model_id(&model_spec));
    let audit = audit::AuditSink::open(&cfg.audit_log).await?;
    if cfg.auth.api_keys.is_empty() && cfg.auth.admin_keys.is_empty() {
        tracing::warn!("no API key configured: the API is open to anyone who can reach {}", cfg.listen);
    }
    let state: SharedState = Arc::new(AppState {
        model_id,
        engine: OnceLock::new(),
        faq: OnceLock::new(),
        default_app: cfg.apps[0].name.clone(),
        apps,
        keys: auth::KeyRing::new(&cfg.auth),
        conversations: ConversationStore::new(cfg.limits.max_conversations, cfg.limits.conversation_max_messages),
        audit,
        prometheus,
        started: Instant::now(),
        node_id: cfg.cluster.node_id(),
        http_addr: OnceLock::new(),
        membership: OnceLock::new(),
        router: OnceLock::new(),
        faq_shards: OnceLock::new(),
        prompt_workers: Arc::new(tokio::sync::Semaphore::new(state::PROMPT_WORKERS)),
        prompt_queue: Default::default(),
        max_prompt_bytes: OnceLock::new(),
        cfg,
    });
    // Every connection is a file descriptor: make sure the cap can be reached.
    listener::ensure_fd_limit(state.cfg.limits.max_connections as u64 + RESERVED_FDS);
    let listener = tokio::net::TcpListener::bind(state.cfg.listen)
        .await
        .with_context(|| format!("binding {}", state.cfg.listen))?;
    let addr = listener.local_addr()?;
    let _ = state.http_addr.set(addr);
    if let Some(url) = state.cfg.cluster.nats.clone() {
        let client = crate::cluster::connect(&url, &format!("ragnode-{}", state.node_id)).await?;
        let weak = Arc::downgrade(&state);
        let recent = std::sync::Mutex::new((0u64, Instant::now()));
        let m = crate::cluster::Membership::join(client, &state.cfg.cluster.name, &state.node_id, move || {
            weak.upgrade().map(|st| local_status(&st, &recent)).unwrap_or_default()
        })
        .await?;
        let _ = state.membership.set(m.clone());
        let _ = state.router.set(Arc::new(routing::Router { membership: m.clone(), model_id: state.model_id.clone() }));
        let weak = Arc::downgrade(&state);
        routing::serve_remote(m.clone(), state.model_id.clone(), move || {
            weak.upgrade().and_then(|s| s.engine.get().cloned())
        })
        .await?;
        start_faq_shards(&state, m).await?;
        tracing::info!(cluster = %state.cfg.cluster.name, node = %state.node_id, nats = %url, "joined the cluster");
    }
    // Tests and scripts wait for this line (stderr) to learn the port.
    eprintln!("ragnode listening on http://{addr}");
    tracing::info!(%addr, model = %state.model_id, "listening; loading the model and the FAQ index");

    let loader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || load(&state, &model_spec, device))
    };
    let app = router(state.clone());
    let limits = listener::ConnLimits::from_config(&state.cfg.limits);
    let mut server = tokio::spawn(listener::serve(listener, app, limits, shutdown_signal()));
    tokio::select! {
        // A signal while loading.
        res = &mut server => return res.context("server task")?.context("serving HTTP"),
        loaded = loader => {
            let shard = loaded.context("loader task")??;
            open_faq(&state, shard).await?;
            eprintln!("ragnode ready: model {} on http://{addr}", state.model_id);
        }
    }
    server.await.context("server task")?.context("serving HTTP")?;
    if let Some(engine) = state.engine.get() {
        engine.shutdown();
    }
    Ok(())
}

/// This node's status for the cluster. `recent` holds the generation-token count and
/// time of the previous call, for tokens/s.
fn local_status(state: &AppState, recent: &std::sync::Mutex<(u64, Instant)>) -> crate::cluster::NodeStatus {
    let mut s = crate::cluster::NodeStatus {
        id: state.node_id.clone(),
        http_addr: state.http_addr.get().map(|a| a.to_string()).unwrap_or_default(),
        model: state.model_id.clone(),
        apps: {
            let mut a: Vec<String> = state.apps.keys().cloned().collect();
            a.sort();
            a
        },
        ready: state.engine.get().is_some() && state.faq.get().is_some(),
        uptime_s: state.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };
    if let Some(engine) = state.engine.get() {
        let st = engine.stats();
        s.running = st.running;
        s.waiting = st.waiting;
        s.kv_cache_usage =
            if st.kv_blocks_total == 0 { 0.0 } else { st.kv_blocks_used as f64 / st.kv_blocks_total as f64 };
        let mut r = recent.lock().unwrap_or_else(|e| e.into_inner());
        let dt = r.1.elapsed().as_secs_f64();
        if dt > 0.0 && r.0 > 0 {
            s.recent_tokens_per_s = (st.generation_tokens.saturating_sub(r.0)) as f64 / dt;
        }
        *r = (st.generation_tokens.max(1), Instant::now());
    }
    if let Some(shards) = state.faq_shards.get() {
        s.faq_shards = shards.statuses();
        s.faq_documents = s.faq_shards.iter().map(|h| h.documents).sum();
        s.faq_shard_count = shards.shards();
        s.faq_replicas = state.cfg.cluster.faq_replicas;
    } else if let Some(faqindex::FaqIndex::Local(shard)) = state.faq.get() {
        s.faq_documents = shard.stats().num_docs;
    }
    s
}

/// `GET /v1/cluster`: the nodes this node sees (itself alone without NATS).
async fn cluster_view(State(state): State<SharedState>) -> axum::Json<serde_json::Value> {
    match state.membership.get() {
        Some(m) => {
            let nodes = m.view.live();
            let c = &state.cfg.cluster;
            let shards = crate::cluster::placement::shard_table(&nodes, c.faq_shards, c.faq_replicas);
            axum::Json(json!({
                "mode": "cluster",
                "cluster": m.cluster,
                "node_id": state.node_id,
                "nodes": nodes,
                "faq": { "shards": c.faq_shards, "replicas": c.faq_replicas, "table": shards },
            }))
        }
        None => {
            let recent = std::sync::Mutex::new((0u64, Instant::now()));
            axum::Json(json!({
                "mode": "embedded",
                "node_id": state.node_id,
                "nodes": [local_status(&state, &recent)],
            }))
        }
    }
}

/// Loads the model, starts the engine and, alone, opens (and seeds) the FAQ shard. The
/// shard is returned, not yet published in the state (see [`open_faq`]); in a cluster
/// there is none (the shards placed here are held by `FaqShards`).
fn load(state: &AppState, model_spec: &str, device: Device) -> Result<Option<Arc<FaqShard>>> {
    let cfg = &state.cfg;
    let shard = if cfg.cluster.nats.is_none() { Some(open_local_faq(cfg)?) } else { None };
    load_engine(state, model_spec, device)?;
    Ok(shard)
}

/// The single node's FAQ shard, seeded when empty.
fn open_local_faq(cfg: &ServeConfig) -> Result<Arc<FaqShard>> {
    let shard = FaqShard::open(&cfg.faq_index, &ShardConfig::default())
        .with_context(|| format!("opening the FAQ index {}", cfg.faq_index.display()))?;
    if let Some(seed) = &cfg.faq_seed
        && shard.stats().num_docs == 0
    {
        let format = Format::from_path(seed)
            .with_context(|| format!("{}: unknown FAQ file extension (jsonl, json, csv)", seed.display()))?;
        let opts = IngestOptions {
            format,
            mapping: FieldMapping::default(),
            batch_rows: 10_000,
            on_commit: &mut |_| {},
            on_progress: &mut |_| {},
        };
        let report =
            ingest_file(&shard, seed, opts).with_context(|| format!("ingesting the FAQ seed {}", seed.display()))?;
        for r in &report.rejected {
            tracing::warn!("{}:{}: rejected: {}", seed.display(), r.pos, r.reason);
        }
        tracing::info!(rows = report.committed, rejected = report.rejected.len(), file = %seed.display(), "FAQ seeded");
    }
    Ok(Arc::new(shard))
}

fn load_engine(state: &AppState, model_spec: &str, device: Device) -> Result<()> {
    let cfg = &state.cfg;
    let t = Instant::now();
    let free_before = ragnode_kernels::device_memory(&device).ok().flatten().map(|(free, _)| free);
    let mut opts = LoadOptions { device: device.clone(), ..LoadOptions::default() };
    if cfg.dummy_weights.is_some() {
        let format = cfg.dummy_format.parse().map_err(|e: String| anyhow::anyhow!("dummy_format: {e}"))?;
        opts.dummy = Some(ragnode_models::DummyWeights { format, seed: 0 });
    }
    let loaded =
        load_model(model_spec, &opts).with_context(|| format!("loading model `{model_spec}` on {}", cfg.device))?;
    if let (Some(before), Some((after, total))) = (free_before, ragnode_kernels::device_memory(&device).ok().flatten())
    {
        let weights = before.saturating_sub(after);
        ::metrics::gauge!("ragnode:gpu_memory_bytes", "kind" => "weights").set(weights as f64);
        ::metrics::gauge!("ragnode:gpu_memory_total_bytes").set(total as f64);
        tracing::info!(device = %cfg.device, weights_mib = weights >> 20, free_mib = after >> 20, "weights on the device");
    }
    let mut tokenizer = loaded.tokenizer;
    if let Some(path) = &cfg.chat_template {
        let source =
            std::fs::read_to_string(path).with_context(|| format!("reading the chat template {}", path.display()))?;
        let t = tokenizer.chat_template();
        let template = ragnode_models::tokenizer::ChatTemplate::new(&source, t.bos_token(), t.eos_token())
            .with_context(|| format!("{}: not a valid chat template", path.display()))?;
        tokenizer = Arc::new((*tokenizer).clone().with_chat_template(template));
        tracing::info!(file = %path.display(), "chat template replaced");
    }
    let e = &cfg.engine;
    let engine_cfg = EngineConfig {
        max_num_seqs: e.max_num_seqs,
        max_batch_tokens: e.max_batch_tokens,
        kv_cache_bytes: e.kv_cache_mib << 20,
        max_waiting: e.max_waiting,
        max_context: e.max_model_len,
        device_memory_utilization: device.is_cuda().then_some(e.gpu_memory_utilization),
        ..EngineConfig::default()
    };
    let engine = Engine::start(loaded.model, tokenizer, engine_cfg).context("starting the engine")?;
    tracing::info!(load_ms = t.elapsed().as_millis() as u64, context = engine.context_limit(), "model loaded");
    let max_prompt_bytes = state::max_prompt_bytes(engine.tokenizer(), engine.context_limit());
    tracing::info!(?max_prompt_bytes, "prompts longer than this are refused before tokenizing");
    let _ = state.max_prompt_bytes.set(max_prompt_bytes);
    let _ = state.engine.set(engine);
    Ok(())
}

/// Cluster mode, at join: opens the FAQ log (seeding it when empty) and starts holding
/// the shards placed on this node, so they replay while the model loads.
async fn start_faq_shards(state: &SharedState, m: Arc<crate::cluster::Membership>) -> Result<()> {
    let c = &state.cfg.cluster;
    let log = Arc::new(crate::cluster::faqlog::FaqLog::open(m.client.clone(), &m.cluster, c.faq_shards).await?);
    if let Some(seed) = &state.cfg.faq_seed
        && log.len().await? == 0
    {
        let entries = read_seed(seed)?;
        let n = entries.len();
        log.append(crate::cluster::faqlog::FaqOp::Upsert { entries }).await?;
        tracing::info!(rows = n, file = %seed.display(), "FAQ log seeded");
    }
    let weak = Arc::downgrade(state);
    let shards =
        crate::cluster::faqshards::FaqShards::start(m, log, state.cfg.faq_index.clone(), c.faq_replicas, move || {
            if let Some(st) = weak.upgrade() {
                for app in st.apps.values() {
                    app.clear_cache();
                }
            }
        });
    let _ = state.faq_shards.set(shards);
    Ok(())
}

/// Publishes the FAQ: the local shard, or — in a cluster — distributed search once the
/// shards placed here serve.
async fn open_faq(state: &SharedState, local: Option<Arc<FaqShard>>) -> Result<()> {
    if let Some(shard) = local {
        let _ = state.faq.set(faqindex::FaqIndex::Local(shard));
        return Ok(());
    }
    let (Some(m), Some(shards)) = (state.membership.get(), state.faq_shards.get()) else {
        anyhow::bail!("cluster mode without a membership");
    };
    let t = Instant::now();
    let limit = std::time::Duration::from_secs(state.cfg.cluster.catch_up_timeout_secs);
    // Placement starts after one status round; then the shards placed here replay.
    tokio::time::sleep(crate::cluster::STATUS_INTERVAL * 2).await;
    while !shards.placed_shards_serving() {
        if t.elapsed() > limit {
            anyhow::bail!("the FAQ shards placed on this node did not catch up with the log within {limit:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tracing::info!(held = ?shards.statuses().iter().map(|h| h.shard).collect::<Vec<_>>(), "FAQ shards caught up");
    let c = &state.cfg.cluster;
    let search = crate::cluster::search::ClusterSearch::new(
        m.clone(),
        shards.clone(),
        std::time::Duration::from_millis(c.shard_timeout_ms),
        std::time::Duration::from_millis(c.hedge_after_ms),
    );
    let _ = state.faq.set(faqindex::FaqIndex::Cluster(Arc::new(search)));
    Ok(())
}

/// A JSONL seed file as entries (cluster mode logs them). As when a single node ingests
/// its seed, a row that is not a valid entry is reported (`FILE:LINE: rejected: reason`)
/// and left out.
fn read_seed(path: &Path) -> Result<Vec<ragnode_retrieval::FaqEntry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str::<ragnode_retrieval::FaqEntry>(line)
            .map_err(|e| format!("not a JSON FAQ entry (cluster seeds are JSONL): {e}"))
            .and_then(|e| e.validate().map(|()| e).map_err(|err| err.to_string()));
        match entry {
            Ok(e) => out.push(e),
            Err(reason) => tracing::warn!("{}:{}: rejected: {reason}", path.display(), i + 1),
        }
    }
    Ok(out)
}

fn default_model_id(spec: &str) -> String {
    let p = Path::new(spec);
    if p.exists() {
        if let Some(stem) = p.file_stem().and_then(|s| s.to_str())
            && p.is_file()
        {
            return stem.to_string();
        }
        if let Some(name) = p.file_name().and_then(|s| s.to_str()) {
            return name.to_string();
        }
    }
    spec.to_string()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// All routes and layers.
pub fn router(state: SharedState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/v1/chat-messages", post(dify::chat_messages))
        .route("/v1/chat/ws", get(ws::upgrade))
        .route("/v1/cluster", get(cluster_view))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(from_fn_with_state(state.clone(), auth::require_api_key));
    let admin = Router::new()
        .route("/v1/admin/faq", post(admin::upsert))
        .route("/v1/admin/faq/search", post(admin::search))
        .route("/v1/admin/faq/stats", get(admin::stats))
        .route("/v1/admin/faq/{id}", get(admin::get).delete(admin::delete))
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin_key));
    let open = Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text));

    let x_request_id = HeaderName::from_static("x-request-id");
    let mut app = Router::new()
        .merge(api)
        .merge(admin)
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CompressionLayer::new().gzip(true).br(true));
    if let Some(cors) = cors_layer(&state.cfg.cors.allow_origins) {
        app = app.layer(cors);
    }
    // Outermost last. The panic guard sits inside the audit layer so a panicking request is
    // still counted and audited (as its 500).
    app.layer(from_fn(panic_guard))
        .layer(from_fn_with_state(state.clone(), extract::drain_unread_body))
        .layer(from_fn_with_state(state.clone(), audit::audit))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .layer(from_fn(audit::sanitize_request_id))
        .with_state(state)
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("api-key"),
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([HeaderName::from_static("x-request-id")]),
    )
}

/// A handler panic answers 500 in OpenAI's format instead of dropping the connection.
async fn panic_guard(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(_) => ApiError::internal("internal error while handling the request").into_response(),
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found("not_found", format!("no route for {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request("method_not_allowed", "method not allowed")
    }
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<SharedState>) -> Response {
    let model = state.engine.get().is_some();
    let index = state.faq.get().is_some();
    let body = json!({
        "ready": model && index,
        "model": { "id": state.model_id, "loaded": model },
        "faq_index": { "path": state.cfg.faq_index, "open": index },
        "device": state.cfg.device.to_string(),
    });
    let status = if model && index { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

async fn metrics_text(State(state): State<SharedState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics::render(&state)).into_response()
}
