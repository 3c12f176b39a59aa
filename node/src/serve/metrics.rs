//! Prometheus metrics. Names follow vLLM's where one exists, with the prefix `ragnode:`
//! (`vllm:time_to_first_token_seconds` → `ragnode:time_to_first_token_seconds`).
//!
//! Counters and histograms are recorded where things happen (the audit middleware, the
//! answer stream, retrieval); gauges (running/waiting requests, KV-cache usage, cache hit
//! ratios) are read from the engine and caches at scrape time.

use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::state::AppState;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0,
];
const RETRIEVAL_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Installs the global recorder (once per process).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("ragnode:retrieval_latency_seconds".into()), RETRIEVAL_BUCKETS)?
        .set_buckets_for_metric(Matcher::Prefix("ragnode:faq_".into()), RETRIEVAL_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("ragnode:http_requests_total", "HTTP requests by route and status.");
    describe_histogram!("ragnode:time_to_first_token_seconds", "Time from arrival to the first generated token.");
    describe_histogram!("ragnode:inter_token_latency_seconds", "Time between generated tokens.");
    describe_histogram!("ragnode:e2e_request_latency_seconds", "Time from arrival to the end of generation.");
    describe_counter!("ragnode:prompt_tokens_total", "Prompt tokens processed.");
    describe_counter!("ragnode:generation_tokens_total", "Tokens generated.");
    describe_counter!("ragnode:request_success_total", "Generations completed (stop or length), by finish reason.");
    describe_gauge!("ragnode:num_requests_running", "Requests in the running batch.");
    describe_gauge!("ragnode:num_requests_waiting", "Requests waiting for admission.");
    describe_gauge!("ragnode:kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1).");
    describe_histogram!("ragnode:retrieval_latency_seconds", "FAQ search time.");
    describe_gauge!("ragnode:answer_cache_hit_ratio", "Hot-answer cache hits / lookups, all apps.");
    describe_counter!("ragnode:answer_cache_hits_total", "Hot-answer cache hits.");
    describe_counter!("ragnode:answer_cache_misses_total", "Hot-answer cache misses.");
    describe_gauge!("ragnode:faq_search_cache_hit_ratio", "FAQ shard search-cache hits / lookups.");
    describe_gauge!("ragnode:faq_documents", "FAQ entries in the shard(s) held here.");
    describe_gauge!("ragnode:faq_shard_replay_lag", "Cluster: FAQ-log messages a held shard has still to apply.");
    describe_gauge!("ragnode:faq_shard_applied_sequence", "Cluster: last FAQ-log sequence a held shard applied.");
    describe_gauge!("ragnode:faq_shard_serving", "Cluster: 1 when a held shard answers queries (caught up).");
    describe_histogram!(
        "ragnode:faq_search_seconds",
        "Cluster: distributed FAQ search time (both phases, all shards)."
    );
    describe_histogram!(
        "ragnode:faq_shard_phase_seconds",
        "Cluster: time for every shard to answer one search phase (stats, search)."
    );
    describe_counter!("ragnode:faq_shard_hedges_total", "Cluster: shard requests re-sent to the other replicas.");
    describe_counter!("ragnode:faq_shard_failures_total", "Cluster: shard requests no replica answered in time.");
    describe_counter!("ragnode:faq_search_partial_total", "Cluster: searches answered without every shard.");
    describe_gauge!("ragnode:conversations", "Conversations kept server-side.");
    describe_counter!(
        "ragnode:engine_requests_finished_total",
        "Generations the engine ended (any reason): one per model run, however many clients shared it."
    );
    describe_counter!(
        "ragnode:answers_coalesced_total",
        "Requests that followed an identical question's generation already in flight."
    );
    describe_gauge!("ragnode:http_connections", "Open HTTP connections (WebSockets included).");
    describe_counter!("ragnode:http_connections_accepted_total", "HTTP connections accepted.");
    describe_counter!(
        "ragnode:http_connections_refused_total",
        "Connections answered and closed at once, by the cap they hit (max_connections, max_connections_per_ip)."
    );
    describe_counter!(
        "ragnode:http_connections_timed_out_total",
        "Idle connections closed: a request head too slow (header) or idle between requests (keep_alive)."
    );
    describe_counter!("ragnode:http_accept_errors_total", "Failed accepts (e.g. out of file descriptors).");
}

pub fn time_to_first_token(d: Duration) {
    metrics::histogram!("ragnode:time_to_first_token_seconds").record(d.as_secs_f64());
}

/// Records `n` tokens that arrived `gap` after the previous ones (each gets `gap / n`).
pub fn inter_token_latency(gap: Duration, n: usize) {
    let h = metrics::histogram!("ragnode:inter_token_latency_seconds");
    let each = gap.as_secs_f64() / n.max(1) as f64;
    for _ in 0..n {
        h.record(each);
    }
}

pub fn e2e_latency(d: Duration, finish_reason: &'static str) {
    metrics::histogram!("ragnode:e2e_request_latency_seconds").record(d.as_secs_f64());
    if matches!(finish_reason, "stop" | "length") {
        metrics::counter!("ragnode:request_success_total", "finished_reason" => finish_reason).increment(1);
    }
}

pub fn prompt_tokens(n: usize) {
    metrics::counter!("ragnode:prompt_tokens_total").increment(n as u64);
}

pub fn generation_tokens(n: usize) {
    metrics::counter!("ragnode:generation_tokens_total").increment(n as u64);
}

pub fn retrieval_latency(d: Duration) {
    metrics::histogram!("ragnode:retrieval_latency_seconds").record(d.as_secs_f64());
}

fn ratio(hits: u64, misses: u64) -> f64 {
    if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 }
}

/// Sets the gauges from live state and renders the exposition text.
pub fn render(state: &AppState) -> String {
    if let Some(engine) = state.engine.get() {
        let s = engine.stats();
        metrics::gauge!("ragnode:num_requests_running").set(s.running as f64);
        metrics::gauge!("ragnode:num_requests_waiting").set(s.waiting as f64);
        let usage = if s.kv_blocks_total == 0 { 0.0 } else { s.kv_blocks_used as f64 / s.kv_blocks_total as f64 };
        metrics::gauge!("ragnode:kv_cache_usage_perc").set(usage);
        metrics::counter!("ragnode:engine_requests_finished_total").absolute(s.finished);
        if state.cfg.device != ragnode_models::DeviceSpec::Cpu {
            metrics::gauge!("ragnode:gpu_memory_bytes", "kind" => "kv_cache").set(s.kv_cache_bytes as f64);
        }
    }
    let (mut hits, mut misses) = (0, 0);
    for app in state.apps.values() {
        let c = app.cache_counters();
        hits += c.hits.load(Ordering::Relaxed);
        misses += c.misses.load(Ordering::Relaxed);
    }
    metrics::counter!("ragnode:answer_cache_hits_total").absolute(hits);
    metrics::counter!("ragnode:answer_cache_misses_total").absolute(misses);
    metrics::gauge!("ragnode:answer_cache_hit_ratio").set(ratio(hits, misses));
    if let Some(super::faqindex::FaqIndex::Local(shard)) = state.faq.get() {
        let st = shard.stats();
        metrics::gauge!("ragnode:faq_search_cache_hit_ratio").set(ratio(st.cache_hits, st.cache_misses));
        metrics::gauge!("ragnode:faq_documents").set(st.num_docs as f64);
    }
    if let Some(shards) = state.faq_shards.get() {
        let held = shards.statuses();
        metrics::gauge!("ragnode:faq_documents").set(held.iter().map(|h| h.documents).sum::<u64>() as f64);
        // Every shard, held or not, so a released shard reads 0 rather than its last value.
        for k in 0..shards.shards() {
            let h = held.iter().find(|h| h.shard == k);
            let shard = k.to_string();
            let (lag, applied, serving) = h.map_or((0, 0, false), |h| (h.lag, h.applied, h.serving));
            metrics::gauge!("ragnode:faq_shard_replay_lag", "shard" => shard.clone()).set(lag as f64);
            metrics::gauge!("ragnode:faq_shard_applied_sequence", "shard" => shard.clone()).set(applied as f64);
            metrics::gauge!("ragnode:faq_shard_serving", "shard" => shard).set(if serving { 1.0 } else { 0.0 });
        }
    }
    metrics::gauge!("ragnode:conversations").set(state.conversations.len() as f64);
    state.prometheus.run_upkeep();
    state.prometheus.render()
}
