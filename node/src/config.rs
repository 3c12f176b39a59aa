//! `ragnode serve` configuration: one typed struct, [`ServeConfig`], filled from (lowest
//! to highest precedence) built-in defaults, a TOML file (`--config`, env
//! `RAGNODE_CONFIG`), `RAGNODE_*` environment variables and command-line flags. Clap
//! reads env vars and flags together (`ServeArgs`); they are laid over the file's values.
//!
//! ```toml
//! listen = "0.0.0.0:8080"
//! model = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! faq_index = "/var/lib/ragnode/index"
//! audit_log = "/var/log/ragnode/audit.jsonl"
//!
//! [engine]
//! max_num_seqs = 64
//! kv_cache_mib = 1024
//!
//! [limits]
//! max_body_bytes = 4194304
//!
//! [[auth.api_keys]]
//! id = "shop-bot"
//! key = "sk-..."
//!
//! [cluster]
//! nats = "nats://nats:4222"
//! name = "shop"
//!
//! [[apps]]
//! name = "faq"
//! top_k = 3
//! direct_answer = true
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

/// Everything `ragnode serve` needs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// A .gguf file, an HF checkpoint directory or a hub repo id.
    pub model: Option<String>,
    /// Instead of `model`: an HF `config.json` whose architecture is built with random
    /// weights (load tests of a deployment's shape without its download; answers are
    /// noise). The config's directory's tokenizer files are used when present.
    pub dummy_weights: Option<PathBuf>,
    /// Storage format of the random weights (`q8_0`, `q4_0`, `bf16`, `f32`...).
    pub dummy_format: String,
    /// The model id clients use (`/v1/models`); default: the file stem or repo id.
    pub served_model_name: Option<String>,
    /// A Jinja chat template file replacing the model's own (GGUF metadata or
    /// tokenizer_config.json).
    pub chat_template: Option<PathBuf>,
    /// The FAQ shard's index directory (created if missing).
    pub faq_index: PathBuf,
    /// FAQ file ingested at start when the index is empty (e.g. the demo FAQ).
    pub faq_seed: Option<PathBuf>,
    /// Compute threads (default: candle's choice, the physical cores).
    pub threads: Option<usize>,
    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (CUDA needs a `--features cuda`
    /// build).
    pub device: ragnode_models::DeviceSpec,
    /// Where audit lines go: `-` for stdout, a file path to append to, `off` for none.
    pub audit_log: String,
    pub engine: EngineSettings,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub cors: CorsConfig,
    /// RAG apps; default one app named `faq` with the default settings.
    pub apps: Vec<AppConfig>,
    pub cluster: ClusterSettings,
}

/// Joining a cluster over NATS (none: the single-node embedded default).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// NATS server URL (`nats://host:4222`); none: run alone.
    pub nats: Option<String>,
    /// Cluster name: nodes with the same NATS and name form one service.
    pub name: String,
    /// This node's id, unique in the cluster (default: the host name).
    pub node_id: Option<String>,
    /// FAQ shards (fixed for the life of the cluster's FAQ log).
    pub faq_shards: u32,
    /// Nodes holding each FAQ shard (fewer while the cluster has fewer nodes).
    pub faq_replicas: u32,
    /// How long a distributed search waits for a shard (per phase) before answering
    /// without it (flagged partial).
    pub shard_timeout_ms: u64,
    /// After this long without a shard's answer the query is also sent to its other
    /// replicas (hedged request).
    pub hedge_after_ms: u64,
    /// How long a starting node waits for its FAQ shards to replay the log.
    pub catch_up_timeout_secs: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            nats: None,
            name: "default".into(),
            node_id: None,
            faq_shards: 8,
            faq_replicas: 2,
            shard_timeout_ms: 1000,
            hedge_after_ms: 50,
            catch_up_timeout_secs: 600,
        }
    }
}

impl ClusterSettings {
    /// The node id: configured, else the host name made subject-safe.
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .unwrap_or_default();
        let id: String = host
            .trim()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
            .take(64)
            .collect();
        if id.is_empty() { "node".into() } else { id }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model: None,
            dummy_weights: None,
            dummy_format: "q8_0".into(),
            served_model_name: None,
            chat_template: None,
            faq_index: PathBuf::from("data/index"),
            faq_seed: None,
            threads: None,
            device: ragnode_models::DeviceSpec::Cpu,
            audit_log: "-".into(),
            engine: EngineSettings::default(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
            cors: CorsConfig::default(),
            apps: Vec::new(),
            cluster: ClusterSettings::default(),
        }
    }
}

/// Engine sizes (see `ragnode_inference::EngineConfig`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    pub max_num_seqs: usize,
    pub max_batch_tokens: usize,
    pub kv_cache_mib: usize,
    /// Requests that may wait for admission beside the `max_num_seqs` running: at most
    /// `max_num_seqs + max_waiting` are accepted at once; more are answered 429.
    pub max_waiting: usize,
    /// Cap on prompt + completion tokens (default: the model's context).
    pub max_model_len: Option<usize>,
    /// On a GPU, the KV cache takes the device memory left after the weights, up to this
    /// fraction of the device in use (`kv_cache_mib` is then ignored).
    pub gpu_memory_utilization: f32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_batch_tokens: 512,
            kv_cache_mib: 1024,
            max_waiting: 256,
            max_model_len: None,
            gpu_memory_utilization: 0.9,
        }
    }
}

/// Request limits.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Longest a request may run (non-streaming: 504; streaming: the stream ends with an
    /// error event).
    pub request_timeout_secs: u64,
    /// A request body must arrive complete within this (and within
    /// `request_timeout_secs`); a slower one gets 408 and its connection is closed.
    pub body_read_timeout_secs: u64,
    /// A request head must arrive complete within this of its first byte, and a new
    /// connection must send its first request within it; else the connection is closed.
    pub header_read_timeout_secs: u64,
    /// A connection idle between requests is closed after this (keep it above a load
    /// balancer's idle timeout, so the balancer closes first: AWS ALB's is 60 s).
    pub keep_alive_timeout_secs: u64,
    /// A client whose socket takes no more of its answer for this long is cut (also
    /// mid-stream).
    pub send_timeout_secs: u64,
    /// Open connections at most (WebSockets included); more are answered 503 and closed.
    /// The open-file limit must allow this many plus the node's own files (checked, and
    /// raised up to the hard limit, at start).
    pub max_connections: usize,
    /// Open connections from one source address at most (429 past it); 0: no cap. Behind
    /// a proxy every connection comes from the proxy: raise it or set 0 there.
    pub max_connections_per_ip: usize,
    /// Largest WebSocket message from a client.
    pub ws_max_message_bytes: usize,
    /// Seconds between server pings on a WebSocket; a socket that misses two pongs is closed.
    pub ws_ping_interval_secs: u64,
    /// Requests in flight on one WebSocket.
    pub ws_max_inflight: usize,
    /// Conversations kept server-side (least recently used dropped first).
    pub max_conversations: usize,
    /// Messages kept per conversation (oldest dropped first).
    pub conversation_max_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            request_timeout_secs: 300,
            body_read_timeout_secs: 30,
            header_read_timeout_secs: 10,
            keep_alive_timeout_secs: 75,
            send_timeout_secs: 60,
            max_connections: 4096,
            max_connections_per_ip: 512,
            ws_max_message_bytes: 256 << 10,
            ws_ping_interval_secs: 30,
            ws_max_inflight: 8,
            max_conversations: 10_000,
            conversation_max_messages: 20,
        }
    }
}

/// API keys. With none configured the API is open (a warning is logged).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Keys for the inference API (`/v1/...`, the WebSocket).
    pub api_keys: Vec<ApiKey>,
    /// Keys for the FAQ admin API (`/v1/admin/...`); they also work as API keys.
    pub admin_keys: Vec<ApiKey>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Named in audit lines instead of the key itself.
    pub id: String,
    pub key: String,
    /// The app this key's Dify-style `/v1/chat-messages` calls go to (default: the first app).
    #[serde(default)]
    pub app: Option<String>,
}

/// Cross-origin access for browsers.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins; `*` for any; empty: no CORS headers (same-origin only).
    pub allow_origins: Vec<String>,
}

/// The seed's "Knowledge Q&A" prompt: answer the question from the FAQ answer in a
/// friendly tone, briefly, then name the source. Variables: `question`, `faq_answer`
/// (the retrieved answers), `sources` (list of {id, question, answer, score, confidence}).
pub const DEFAULT_PROMPT_TEMPLATE: &str = "\
你是一家网店的客服助手。请根据下面的知识库内容，用友好的语气回答用户的问题，\
不超过100个字（英文问题用英文回答，不超过100个词），最后写“来源: ”和所依据的问题。

知识库内容:
{{ faq_answer }}

用户问题: {{ question }}";

/// A RAG app: retrieve from the FAQ, prompt, generate.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Addressed as model `app:<name>` and in `/v1/chat-messages?app=<name>`.
    pub name: String,
    /// minijinja template of the user turn sent to the model.
    pub prompt_template: String,
    /// System message before the conversation.
    pub system_prompt: Option<String>,
    /// FAQ hits retrieved.
    pub top_k: usize,
    /// Hits below this confidence are not given to the model.
    pub min_confidence: f32,
    /// Answer a hit at or above `direct_answer_confidence` with its stored answer,
    /// without the model.
    pub direct_answer: bool,
    pub direct_answer_confidence: f32,
    /// Answer when no hit reaches `min_confidence` (instead of asking the model).
    pub no_answer: Option<String>,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    /// Cache first-turn answers per normalised question.
    pub cache: bool,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            name: "faq".into(),
            prompt_template: DEFAULT_PROMPT_TEMPLATE.into(),
            system_prompt: None,
            top_k: 3,
            min_confidence: 0.2,
            direct_answer: true,
            direct_answer_confidence: 0.8,
            no_answer: None,
            temperature: 0.3,
            top_p: 1.0,
            max_tokens: 100,
            cache: true,
        }
    }
}

/// Flags of `ragnode serve`; each can also be set by the env var named in `--help`, and
/// all of them (and more) in the `--config` file.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML config file (see ARCHITECTURE.md / node/src/config.rs for every key).
    #[arg(long, env = "RAGNODE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "RAGNODE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A .gguf file, an HF checkpoint directory, or a Hugging Face repo id.
    #[arg(long, env = "RAGNODE_MODEL")]
    pub model: Option<String>,
    /// Random weights of the architecture in this config.json instead of --model (load
    /// tests; the answers are noise).
    #[arg(long, env = "RAGNODE_DUMMY_WEIGHTS", value_name = "CONFIG.json", conflicts_with = "model")]
    pub dummy_weights: Option<PathBuf>,
    /// Format of the random weights: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k [default: q8_0].
    #[arg(long, env = "RAGNODE_DUMMY_FORMAT")]
    pub dummy_format: Option<String>,
    /// Model id served to clients [default: the model file stem].
    #[arg(long, env = "RAGNODE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// A Jinja chat template file replacing the model's own.
    #[arg(long, env = "RAGNODE_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// FAQ index directory [default: data/index].
    #[arg(long, env = "RAGNODE_FAQ_INDEX")]
    pub faq_index: Option<PathBuf>,
    /// FAQ file (JSONL/JSON/CSV) ingested at start if the index is empty.
    #[arg(long, env = "RAGNODE_FAQ_SEED")]
    pub faq_seed: Option<PathBuf>,
    /// API key, `KEY` or `ID=KEY` (repeatable; env: comma-separated).
    #[arg(long = "api-key", env = "RAGNODE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Admin key for the FAQ admin API, `KEY` or `ID=KEY` (repeatable; env: comma-separated).
    #[arg(long = "admin-key", env = "RAGNODE_ADMIN_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub admin_keys: Vec<String>,
    /// Audit log: `-` (stdout), a file to append to, or `off` [default: -].
    #[arg(long, env = "RAGNODE_AUDIT_LOG")]
    pub audit_log: Option<String>,
    /// Sequences decoding together [default: 64].
    #[arg(long, env = "RAGNODE_MAX_NUM_SEQS")]
    pub max_num_seqs: Option<usize>,
    /// Token budget of one engine step [default: 512].
    #[arg(long, env = "RAGNODE_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Where the model runs: cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "RAGNODE_DEVICE")]
    pub device: Option<ragnode_models::DeviceSpec>,
    /// On a GPU: fraction of device memory in use once the KV cache is allocated [default: 0.9].
    #[arg(long, env = "RAGNODE_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: Option<f32>,
    /// KV-cache memory in MiB (CPU) [default: 1024].
    #[arg(long, env = "RAGNODE_KV_CACHE_MIB")]
    pub kv_cache_mib: Option<usize>,
    /// Requests that may wait beside the max-num-seqs running before 429 [default: 256].
    #[arg(long, env = "RAGNODE_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Cap on prompt + completion tokens [default: the model's context].
    #[arg(long, env = "RAGNODE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Largest request body in bytes [default: 4 MiB].
    #[arg(long, env = "RAGNODE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Per-request time limit in seconds [default: 300].
    #[arg(long, env = "RAGNODE_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Seconds between WebSocket pings [default: 30].
    #[arg(long, env = "RAGNODE_WS_PING_INTERVAL_SECS")]
    pub ws_ping_interval_secs: Option<u64>,
    /// Seconds a request body may take to arrive [default: 30].
    #[arg(long, env = "RAGNODE_BODY_READ_TIMEOUT_SECS")]
    pub body_read_timeout_secs: Option<u64>,
    /// Seconds a request head may take to arrive (and a new connection to send one) [default: 10].
    #[arg(long, env = "RAGNODE_HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds an idle keep-alive connection is kept open [default: 75].
    #[arg(long, env = "RAGNODE_KEEP_ALIVE_TIMEOUT_SECS")]
    pub keep_alive_timeout_secs: Option<u64>,
    /// Seconds a client may take none of its answer before it is cut [default: 60].
    #[arg(long, env = "RAGNODE_SEND_TIMEOUT_SECS")]
    pub send_timeout_secs: Option<u64>,
    /// Open connections at most [default: 4096].
    #[arg(long, env = "RAGNODE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections per source address at most; 0: no cap [default: 512].
    #[arg(long, env = "RAGNODE_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// NATS server to join a cluster through (`nats://host:4222`); none: a single node.
    #[arg(long, env = "RAGNODE_NATS")]
    pub nats: Option<String>,
    /// Cluster name [default: default].
    #[arg(long = "cluster", env = "RAGNODE_CLUSTER")]
    pub cluster_name: Option<String>,
    /// This node's id in the cluster [default: the host name].
    #[arg(long, env = "RAGNODE_NODE_ID")]
    pub node_id: Option<String>,
    /// FAQ shards in the cluster [default: 8]; must match the cluster's FAQ log.
    #[arg(long, env = "RAGNODE_FAQ_SHARDS")]
    pub faq_shards: Option<u32>,
    /// Nodes holding each FAQ shard [default: 2].
    #[arg(long, env = "RAGNODE_FAQ_REPLICAS")]
    pub faq_replicas: Option<u32>,
    /// Allowed CORS origin, or `*` (repeatable; env: comma-separated).
    #[arg(long = "cors-origin", env = "RAGNODE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
}

impl ServeConfig {
    /// Builds the config: defaults, then the file, then env vars and flags; validated.
    pub fn load(args: &ServeArgs, threads: Option<usize>) -> Result<Self> {
        let mut cfg = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        cfg.apply(args, threads)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        // toml's errors name the line and column.
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    fn apply(&mut self, a: &ServeArgs, threads: Option<usize>) -> Result<()> {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        set(&mut self.listen, &a.listen);
        if a.model.is_some() {
            self.model = a.model.clone();
        }
        if a.dummy_weights.is_some() {
            self.dummy_weights = a.dummy_weights.clone();
        }
        set(&mut self.dummy_format, &a.dummy_format);
        if a.served_model_name.is_some() {
            self.served_model_name = a.served_model_name.clone();
        }
        if a.chat_template.is_some() {
            self.chat_template = a.chat_template.clone();
        }
        set(&mut self.faq_index, &a.faq_index);
        if a.faq_seed.is_some() {
            self.faq_seed = a.faq_seed.clone();
        }
        if threads.is_some() {
            self.threads = threads;
        }
        set(&mut self.audit_log, &a.audit_log);
        set(&mut self.engine.max_num_seqs, &a.max_num_seqs);
        set(&mut self.engine.max_batch_tokens, &a.max_batch_tokens);
        set(&mut self.engine.kv_cache_mib, &a.kv_cache_mib);
        set(&mut self.device, &a.device);
        set(&mut self.engine.gpu_memory_utilization, &a.gpu_memory_utilization);
        set(&mut self.engine.max_waiting, &a.max_waiting);
        if a.max_model_len.is_some() {
            self.engine.max_model_len = a.max_model_len;
        }
        set(&mut self.limits.max_body_bytes, &a.max_body_bytes);
        set(&mut self.limits.request_timeout_secs, &a.request_timeout_secs);
        set(&mut self.limits.ws_ping_interval_secs, &a.ws_ping_interval_secs);
        set(&mut self.limits.body_read_timeout_secs, &a.body_read_timeout_secs);
        set(&mut self.limits.header_read_timeout_secs, &a.header_read_timeout_secs);
        set(&mut self.limits.keep_alive_timeout_secs, &a.keep_alive_timeout_secs);
        set(&mut self.limits.send_timeout_secs, &a.send_timeout_secs);
        set(&mut self.limits.max_connections, &a.max_connections);
        set(&mut self.limits.max_connections_per_ip, &a.max_connections_per_ip);
        for (i, spec) in a.api_keys.iter().enumerate() {
            self.auth.api_keys.push(parse_key(spec, "key", i)?);
        }
        for (i, spec) in a.admin_keys.iter().enumerate() {
            self.auth.admin_keys.push(parse_key(spec, "admin", i)?);
        }
        self.cors.allow_origins.extend(a.cors_origins.iter().cloned());
        if a.nats.is_some() {
            self.cluster.nats = a.nats.clone();
        }
        set(&mut self.cluster.name, &a.cluster_name);
        if a.node_id.is_some() {
            self.cluster.node_id = a.node_id.clone();
        }
        set(&mut self.cluster.faq_shards, &a.faq_shards);
        set(&mut self.cluster.faq_replicas, &a.faq_replicas);
        if self.apps.is_empty() {
            self.apps.push(AppConfig::default());
        }
        Ok(())
    }

    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<()> {
        match (&self.model, &self.dummy_weights) {
            (None, None) => {
                bail!("no model: pass --model PATH (or set RAGNODE_MODEL, or `model` in the config file)")
            }
            (Some(_), Some(_)) => bail!("`model` and `dummy_weights` exclude each other: configure one"),
            _ => {}
        }
        if self.dummy_weights.is_some() {
            self.dummy_format
                .parse::<ragnode_models::weights::RandomFormat>()
                .map_err(|e| anyhow::anyhow!("dummy_format: {e}"))?;
        }
        let e = &self.engine;
        if e.max_num_seqs == 0 || e.max_batch_tokens == 0 || e.kv_cache_mib == 0 {
            bail!("engine.max_num_seqs, engine.max_batch_tokens and engine.kv_cache_mib must be > 0");
        }
        if !(e.gpu_memory_utilization > 0.0 && e.gpu_memory_utilization <= 1.0) {
            bail!("engine.gpu_memory_utilization must be in (0, 1], got {}", e.gpu_memory_utilization);
        }
        let l = &self.limits;
        if l.max_body_bytes < 1024 {
            bail!("limits.max_body_bytes must be at least 1024");
        }
        if l.request_timeout_secs == 0 || l.ws_ping_interval_secs == 0 || l.ws_max_inflight == 0 {
            bail!("limits.request_timeout_secs, ws_ping_interval_secs and ws_max_inflight must be > 0");
        }
        if l.body_read_timeout_secs == 0
            || l.header_read_timeout_secs == 0
            || l.keep_alive_timeout_secs == 0
            || l.send_timeout_secs == 0
            || l.max_connections == 0
        {
            bail!(
                "limits.body_read_timeout_secs, header_read_timeout_secs, keep_alive_timeout_secs, send_timeout_secs and max_connections must be > 0"
            );
        }
        let mut names = std::collections::HashSet::new();
        for app in &self.apps {
            if app.name.is_empty() || !app.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                bail!("app name {:?}: use letters, digits, '-', '_' or '.'", app.name);
            }
            if !names.insert(app.name.as_str()) {
                bail!("app {:?} is defined twice", app.name);
            }
            if app.top_k == 0 || app.max_tokens == 0 {
                bail!("app {:?}: top_k and max_tokens must be > 0", app.name);
            }
            if !(0.0..=1.0).contains(&app.min_confidence) || !(0.0..=1.0).contains(&app.direct_answer_confidence) {
                bail!("app {:?}: confidences must be in [0, 1]", app.name);
            }
            if !(app.temperature >= 0.0 && app.top_p > 0.0 && app.top_p <= 1.0) {
                bail!("app {:?}: temperature must be >= 0 and top_p in (0, 1]", app.name);
            }
        }
        crate::cluster::check_token("cluster name", &self.cluster.name)?;
        crate::cluster::check_token("node id", &self.cluster.node_id())?;
        let c = &self.cluster;
        if !(1..=1024).contains(&c.faq_shards) || c.faq_replicas == 0 {
            bail!("cluster.faq_shards must be in 1..=1024 and cluster.faq_replicas > 0");
        }
        if c.shard_timeout_ms == 0 || c.hedge_after_ms == 0 || c.catch_up_timeout_secs == 0 {
            bail!("cluster.shard_timeout_ms, hedge_after_ms and catch_up_timeout_secs must be > 0");
        }
        let mut keys = std::collections::HashSet::new();
        for k in self.auth.api_keys.iter().chain(&self.auth.admin_keys) {
            if k.key.len() < 8 {
                bail!("API key {:?} is shorter than 8 characters", k.id);
            }
            if !keys.insert(k.key.as_str()) {
                bail!("API key {:?} is configured twice", k.id);
            }
            if let Some(app) = &k.app
                && !names.contains(app.as_str())
            {
                bail!("API key {:?} names app {app:?}, which is not configured", k.id);
            }
        }
        Ok(())
    }
}

/// `KEY` or `ID=KEY`, where ID is a plain name (letters, digits, `-`, `_`, `.`); a key
/// itself may contain `=` (base64). Errors never print the key.
fn parse_key(spec: &str, prefix: &str, i: usize) -> Result<ApiKey> {
    let spec = spec.trim();
    let is_name = |id: &str| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let (id, key) = match spec.split_once('=') {
        Some((id, key)) if is_name(id) && !key.is_empty() => (id.to_string(), key.to_string()),
        _ => (format!("{prefix}-{}", i + 1), spec.to_string()),
    };
    if key.is_empty() {
        bail!("{prefix} key #{} is empty", i + 1);
    }
    Ok(ApiKey { id, key, app: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile_dir();
        let path = dir.join("ragnode.toml");
        std::fs::write(
            &path,
            "model = \"a.gguf\"\nlisten = \"0.0.0.0:9000\"\n[engine]\nmax_waiting = 7\n[[apps]]\nname = \"shop\"\ntop_k = 5\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            model: Some("b.gguf".into()),
            api_keys: vec!["bot=sk-12345678".into()],
            ..Default::default()
        };
        let cfg = ServeConfig::load(&args, None).unwrap();
        assert_eq!(cfg.model.as_deref(), Some("b.gguf"));
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.engine.max_waiting, 7);
        assert_eq!(cfg.engine.max_num_seqs, 64);
        assert_eq!(cfg.apps.len(), 1);
        assert_eq!(cfg.apps[0].name, "shop");
        assert_eq!(cfg.apps[0].top_k, 5);
        assert_eq!(cfg.apps[0].temperature, 0.3);
        assert_eq!(cfg.auth.api_keys[0].id, "bot");
        assert_eq!(cfg.auth.api_keys[0].key, "sk-12345678");
        let k = parse_key("c2stYWJjZGVmZ2g=", "key", 0).unwrap();
        assert_eq!((k.id.as_str(), k.key.as_str()), ("key-1", "c2stYWJjZGVmZ2g="));
        let k = parse_key("bot=c2stYWJjZGVmZ2g==", "key", 0).unwrap();
        assert_eq!((k.id.as_str(), k.key.as_str()), ("bot", "c2stYWJjZGVmZ2g=="));
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let dir = tempfile_dir();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "model = \"a.gguf\"\n\n[engine]\nmax_wating = 7\n").unwrap();
        let err = format!("{:#}", ServeConfig::from_file(&path).unwrap_err());
        assert!(err.contains("bad.toml") && err.contains("line 4") && err.contains("max_wating"), "{err}");

        let mut cfg = ServeConfig { model: Some("m".into()), ..Default::default() };
        cfg.apps = vec![AppConfig::default(), AppConfig::default()];
        assert!(cfg.validate().unwrap_err().to_string().contains("defined twice"));
        let cfg = ServeConfig::default();
        assert!(cfg.validate().unwrap_err().to_string().contains("--model"));
    }

    #[test]
    fn the_example_deploy_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ragnode.toml");
        let cfg = ServeConfig::from_file(&path).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.auth.api_keys[1].app.as_deref(), Some("faq"));
        assert_eq!(cfg.apps[0].direct_answer_confidence, 0.8);
        assert_eq!((cfg.device, cfg.engine.gpu_memory_utilization), (ragnode_models::DeviceSpec::Cpu, 0.9));
        // A device the parser rejects names the file and the accepted forms.
        let dir = tempfile_dir();
        let bad = dir.join("bad-device.toml");
        std::fs::write(&bad, "device = \"tpu:0\"\n").unwrap();
        let err = ServeConfig::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad-device.toml") && err.contains("cpu, cuda or cuda:N"), "{err}");
        let mut cfg = cfg;
        cfg.engine.gpu_memory_utilization = 1.5;
        assert!(cfg.validate().unwrap_err().to_string().contains("gpu_memory_utilization"));
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ragnode-config-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
