//! Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen: the Llama decoder with biases on the q/k/v
//! projections, so it runs on [`crate::llama::Model`]; this module maps its config.

use serde::Deserialize;

use crate::llama::{Config, Family, HfConfig};

#[derive(Deserialize)]
struct SlidingWindow {
    #[serde(default)]
    use_sliding_window: bool,
}

/// Parses a `config.json` of `Qwen2ForCausalLM`.
pub fn config_from_hf_json(json: &str) -> Result<Config, String> {
    let hf: HfConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let sw: SlidingWindow = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if sw.use_sliding_window {
        // Released Qwen2 checkpoints ship with it off; full attention is the safe superset.
        tracing::warn!("use_sliding_window is set; ragnode attends over the full context");
    }
    hf.into_config(Family::Qwen2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let cfg = config_from_hf_json(
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
                "use_sliding_window": false, "sliding_window": 4096}"#,
        )
        .unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias);
        assert_eq!(cfg.family, Family::Qwen2);
        assert_eq!(cfg.rope_theta, 1e6);
    }
}
