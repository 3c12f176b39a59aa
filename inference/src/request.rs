//! What callers send to the engine and what streams back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sampling::{SampledLogprobs, SamplingParams};

/// Engine-assigned request id (unique per engine).
pub type RequestId = u64;

/// A tokenized generation request.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate (≥ 1).
    pub max_tokens: usize,
    /// Strings that end generation; not included in the output.
    pub stop: Vec<String>,
    /// Token ids that end generation, in addition to the model's end-of-turn tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-turn tokens (benchmarks).
    pub ignore_eos: bool,
}

impl GenerationRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why a stream ended (OpenAI's `finish_reason`, plus the engine's own cases).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-turn token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// The caller cancelled (or dropped the stream).
    Cancelled,
    /// The engine failed while running the request.
    Error,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Latencies of one request, measured by the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From submission to admission into the running batch.
    pub queued: Duration,
    /// From submission to the first generated token.
    pub time_to_first_token: Option<Duration>,
    /// From submission to the end.
    pub total: Duration,
}

/// An event of a token stream (serializable: streams also cross the cluster).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// New output. `text` is whole characters (it may be empty while a character or a
    /// possible stop string is pending); `token_ids` are the tokens this event accounts for.
    Delta { text: String, token_ids: Vec<u32>, logprobs: Vec<SampledLogprobs> },
    /// The last event of every stream.
    Finished { reason: FinishReason, usage: Usage, timings: Timings, error: Option<String> },
}

/// The receiving end of a request's events. Dropping it cancels the request; its KV
/// blocks return to the pool at the engine's next step.
#[derive(Debug)]
pub struct TokenStream {
    pub(crate) id: RequestId,
    pub(crate) rx: tokio::sync::mpsc::UnboundedReceiver<StreamEvent>,
}

impl TokenStream {
    /// A stream whose events the caller sends (tests of consumers, adapters).
    pub fn from_channel(id: RequestId, rx: tokio::sync::mpsc::UnboundedReceiver<StreamEvent>) -> Self {
        Self { id, rx }
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event, or `None` after `Finished`.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        self.rx.recv().await
    }

    /// Blocking variant for synchronous callers (CLI, tests). Must not be called inside an
    /// async runtime.
    pub fn next_blocking(&mut self) -> Option<StreamEvent> {
        self.rx.blocking_recv()
    }

    /// Drains the stream: the full text, all token ids and the final event's fields.
    pub fn collect_blocking(mut self) -> Collected {
        let mut c = Collected::default();
        while let Some(ev) = self.next_blocking() {
            match ev {
                StreamEvent::Delta { text, token_ids, .. } => {
                    c.text.push_str(&text);
                    c.token_ids.extend(token_ids);
                }
                StreamEvent::Finished { reason, usage, error, .. } => {
                    c.finish_reason = Some(reason);
                    c.usage = usage;
                    c.error = error;
                }
            }
        }
        c
    }
}

/// A whole stream, drained.
#[derive(Clone, Debug, Default)]
pub struct Collected {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: Option<FinishReason>,
    pub usage: Usage,
    pub error: Option<String>,
}
