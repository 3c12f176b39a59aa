//! Turning logits into the next token: penalties, temperature, top-k / top-p / min-p
//! truncation, seeded sampling, greedy at temperature 0, and log-probabilities.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Per-request sampling settings. The defaults sample from the model's distribution
/// unchanged (temperature 1, no truncation, no penalties).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 disables it.
    pub min_p: f32,
    /// HF-style: divides positive / multiplies negative logits of every token already in
    /// the prompt or output; 1 disables it.
    pub repetition_penalty: f32,
    /// OpenAI-style: subtracted once from tokens already generated.
    pub presence_penalty: f32,
    /// OpenAI-style: subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    /// Same seed, same prompt, same settings ⇒ same output.
    pub seed: Option<u64>,
    /// Return the chosen token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Rejects settings outside their documented ranges.
    pub fn validate(&self) -> Result<(), String> {
        let finite = [
            self.temperature,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
        ];
        if finite.iter().any(|v| !v.is_finite()) {
            return Err("sampling parameters must be finite numbers".into());
        }
        if self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) || !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err("presence_penalty and frequency_penalty must be in [-2, 2]".into());
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return Err("at most 20 top logprobs can be returned".into());
        }
        Ok(())
    }
}

/// Log-probability of a token under the model's (unpenalised, untempered) distribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// The chosen token's log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampledLogprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// One request's sampler: its settings, its random stream and its token counts.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each generated token (presence / frequency penalties).
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt (repetition penalty).
    prompt_tokens: Vec<u32>,
    scratch: Vec<(u32, f32)>,
}

/// Candidates examined before falling back to a full sort for top-p.
const TOP_P_PRESELECT: usize = 1024;

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let mut prompt_tokens = if params.repetition_penalty != 1.0 { prompt.to_vec() } else { Vec::new() };
        prompt_tokens.sort_unstable();
        prompt_tokens.dedup();
        Self { params, rng, generated: HashMap::new(), prompt_tokens, scratch: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> (u32, Option<SampledLogprobs>) {
        // Log-probabilities describe the model's own distribution: take them before the
        // penalties touch the logits.
        let raw = self.params.logprobs.map(|n| {
            let lsm = LogSoftmax::new(logits);
            let top = lsm.top(logits, n);
            (lsm, top, logits.to_vec())
        });
        self.apply_penalties(logits);
        let token = if self.params.temperature <= 1e-5 { argmax(logits) } else { self.sample_truncated(logits) };
        *self.generated.entry(token).or_insert(0) += 1;
        let logprobs = raw.map(|(lsm, top, raw_logits)| SampledLogprobs {
            chosen: TokenLogprob { token, logprob: lsm.logprob(raw_logits[token as usize]) },
            top,
        });
        (token, logprobs)
    }

    /// This request's settings for sampling on the device ([`ragnode_kernels::sampling`]),
    /// or `None` when it needs the logits on the host (penalties, log-probabilities). The
    /// draw `u` is left 0: [`Sampler::draw`] takes it from the request's generator.
    pub fn device_settings(&self) -> Option<ragnode_kernels::sampling::RowSampling> {
        let p = &self.params;
        let penalties = p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        if penalties || p.logprobs.is_some() {
            return None;
        }
        Some(ragnode_kernels::sampling::RowSampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            u: 0.0,
        })
    }

    /// The uniform draw for one token sampled elsewhere (none at temperature 0, as here).
    pub fn draw(&mut self, temperature: f32) -> f32 {
        if temperature <= 1e-5 { 0.0 } else { self.rng.random::<f32>() }
    }

    /// Counts a token sampled elsewhere (the device) as generated.
    pub fn record(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let penalise =
                |l: &mut f32| *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            for &t in &self.prompt_tokens {
                if !self.generated.contains_key(&t)
                    && let Some(l) = logits.get_mut(t as usize)
                {
                    penalise(l)
                }
            }
            for &t in self.generated.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    penalise(l)
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    fn sample_truncated(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())));
        // Most likely first within the kept prefix; ties keep the lower id for determinism.
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, by_prob);
            cands.truncate(p.top_k);
        }
        if p.min_p > 0.0 {
            // The most likely token has weight exp(0) = 1.
            cands.retain(|c| c.1 >= p.min_p);
        }
        if p.top_p < 1.0 {
            let total: f32 = cands.iter().map(|c| c.1).sum();
            let target = p.top_p * total;
            if cands.len() > TOP_P_PRESELECT {
                let mut head: Vec<(u32, f32)> = cands.clone();
                head.select_nth_unstable_by(TOP_P_PRESELECT - 1, by_prob);
                head.truncate(TOP_P_PRESELECT);
                if head.iter().map(|c| c.1).sum::<f32>() >= target {
                    *cands = head;
                }
            }
            cands.sort_unstable_by(by_prob);
            let mut acc = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                acc += c.1;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
        } else {
            cands.sort_unstable_by(by_prob);
        }
        let total: f32 = cands.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in cands.iter() {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        cands.last().map_or(0, |c| c.0)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

struct LogSoftmax {
    max: f32,
    log_sum: f32,
}

impl LogSoftmax {
    fn new(logits: &[f32]) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
        Self { max, log_sum: sum.ln() }
    }

    fn logprob(&self, l: f32) -> f32 {
        l - self.max - self.log_sum
    }

    /// The `n` most likely tokens with their log-probabilities, most likely first.
    fn top(&self, logits: &[f32], n: usize) -> Vec<TokenLogprob> {
        let n = n.min(logits.len());
        if n == 0 {
            return Vec::new();
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if n < idx.len() {
            idx.select_nth_unstable_by(n - 1, cmp);
            idx.truncate(n);
        }
        idx.sort_unstable_by(cmp);
        idx.iter().map(|&t| TokenLogprob { token: t, logprob: self.logprob(logits[t as usize]) }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 2.5]
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&mut logits()).0, 1);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seeds_differ() {
        let params = |seed| SamplingParams { seed: Some(seed), ..SamplingParams::default() };
        let draw = |seed| {
            let mut s = Sampler::new(params(seed), &[]);
            (0..64).map(|_| s.sample(&mut logits()).0).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_truncates() {
        let mut s = Sampler::new(SamplingParams { top_k: 1, seed: Some(1), ..Default::default() }, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits()).0, 1);
        }
        // With a tiny top_p only the most likely token survives.
        let mut s = Sampler::new(SamplingParams { top_p: 0.01, seed: Some(2), ..Default::default() }, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits()).0, 1);
        }
        // top_k = 2 only ever yields the two best.
        let mut s =
            Sampler::new(SamplingParams { top_k: 2, temperature: 5.0, seed: Some(3), ..Default::default() }, &[]);
        for _ in 0..200 {
            let t = s.sample(&mut logits()).0;
            assert!(t == 1 || t == 4, "{t}");
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p(3)/p(1) = e^-4 ≈ 0.018 < 0.05: token 3 is never drawn, even at high temperature.
        let mut s = Sampler::new(SamplingParams { min_p: 0.05, seed: Some(9), ..Default::default() }, &[]);
        for _ in 0..500 {
            assert_ne!(s.sample(&mut logits()).0, 3);
        }
    }

    #[test]
    fn penalties_move_away_from_repeats() {
        // Frequency penalty: after token 1 is chosen twice its logit drops below token 4's.
        let mut s =
            Sampler::new(SamplingParams { temperature: 0.0, frequency_penalty: 0.4, ..Default::default() }, &[]);
        assert_eq!(s.sample(&mut logits()).0, 1); // 3.0
        assert_eq!(s.sample(&mut logits()).0, 1); // 3.0 - 0.4 = 2.6 > 2.5
        assert_eq!(s.sample(&mut logits()).0, 4); // 3.0 - 0.8 = 2.2 < 2.5
        // Repetition penalty on prompt tokens: 3.0 / 2 = 1.5 < 2.5.
        let mut s =
            Sampler::new(SamplingParams { temperature: 0.0, repetition_penalty: 2.0, ..Default::default() }, &[1]);
        assert_eq!(s.sample(&mut logits()).0, 4);
        // Presence penalty.
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, presence_penalty: 1.0, ..Default::default() }, &[]);
        assert_eq!(s.sample(&mut logits()).0, 1);
        assert_eq!(s.sample(&mut logits()).0, 4);
    }

    #[test]
    fn logprobs_are_normalised_and_from_raw_logits() {
        let mut s = Sampler::new(
            SamplingParams { temperature: 0.0, logprobs: Some(5), frequency_penalty: 2.0, ..Default::default() },
            &[],
        );
        let (_, lp) = s.sample(&mut logits());
        let lp = lp.unwrap();
        let total: f32 = lp.top.iter().map(|t| t.logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(lp.top[0].token, 1);
        assert_eq!(lp.chosen.token, 1);
        assert!((lp.chosen.logprob - lp.top[0].logprob).abs() < 1e-7);
        // Second step: penalties changed the choice, not the reported raw distribution.
        let (t, lp) = s.sample(&mut logits());
        let lp = lp.unwrap();
        assert_eq!(t, 4);
        assert!((lp.chosen.logprob - lp.top.iter().find(|x| x.token == 4).unwrap().logprob).abs() < 1e-7);
    }

    #[test]
    fn validation() {
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: f32::NAN, ..Default::default() }.validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
