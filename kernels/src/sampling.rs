//! Sampling many rows of logits at once on the device that holds them, so that only the
//! chosen token ids cross PCIe (a 150k-token vocabulary is 600 KB of f32 per row).
//!
//! The rule ([`sample_rows_reference`], which the CUDA kernel follows):
//! - temperature ≤ 1e-5: argmax, the lowest id on ties;
//! - otherwise weights `w = exp((logit − max) / temperature)` (the top one is 1); a token is
//!   kept when `w ≥ τ`, `τ = max(k-th largest w [top_k > 0], min_p, τ_p)`, where `τ_p` is
//!   the largest weight whose set `{w ≥ τ_p}` still holds `top_p` of the mass the first
//!   two rules kept (ties at a threshold are all kept);
//! - the draw `u ∈ [0, 1)` picks the first id, in id order, whose running kept mass exceeds
//!   `u ×` the kept mass (the last kept id of positive weight if rounding leaves it short).
//!
//! The caller draws `u` from the request's seeded generator, so a seed reproduces a run
//! on the same device. Penalties and log-probabilities need the logits on the host: the
//! engine samples such rows there.

use candle_core::{DType, Device, Result, Tensor, bail};

/// One row's settings and its uniform draw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    /// 0 disables it.
    pub top_k: usize,
    /// 1 disables it.
    pub top_p: f32,
    /// 0 disables it.
    pub min_p: f32,
    /// Uniform in [0, 1).
    pub u: f32,
}

impl RowSampling {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.0 }
    }
}

/// Samples one id per row of `logits: [R, V]` (f32) with `rows[r]`'s settings. On CUDA the
/// kernel runs on the device and only the ids are copied back.
pub fn sample_rows(logits: &Tensor, rows: &[RowSampling]) -> Result<Vec<u32>> {
    let (r, v) = logits.dims2()?;
    if r != rows.len() {
        bail!("sample_rows: {r} rows of logits for {} settings", rows.len())
    }
    if v == 0 {
        bail!("sample_rows: empty vocabulary")
    }
    match logits.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let logits = logits.to_dtype(DType::F32)?.contiguous()?;
            logits.apply_op1_no_bwd(&crate::cuda::SampleRows { rows: rows.to_vec() })?.to_vec1::<u32>()
        }
        _ => {
            let host: Vec<f32> = logits.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            Ok(sample_rows_reference(&host, v, rows))
        }
    }
}

/// The sampling rule on host memory: `logits` is `rows.len()` rows of `vocab`.
pub fn sample_rows_reference(logits: &[f32], vocab: usize, rows: &[RowSampling]) -> Vec<u32> {
    rows.iter().enumerate().map(|(r, s)| sample_row(&logits[r * vocab..(r + 1) * vocab], s)).collect()
}

fn sample_row(logits: &[f32], s: &RowSampling) -> u32 {
    let mut argmax = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[argmax] {
            argmax = i;
        }
    }
    if s.temperature <= 1e-5 {
        return argmax as u32;
    }
    let (max, inv_t) = (logits[argmax], 1.0 / s.temperature);
    let w: Vec<f32> = logits.iter().map(|&l| ((l - max) * inv_t).exp()).collect();
    let mut tau = 0f32;
    if s.top_k > 0 && s.top_k < w.len() {
        let mut sorted = w.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        tau = sorted[s.top_k - 1];
    }
    tau = tau.max(s.min_p);
    if s.top_p < 1.0 {
        let mass = |t: f32| w.iter().filter(|&&x| x >= t).sum::<f32>();
        let target = s.top_p * mass(tau);
        // Largest weight t >= tau whose kept mass still reaches the target: bisection on
        // the float bits (positive floats order like their bits), as on the device.
        let (mut lo, mut hi) = (tau.to_bits(), 1f32.to_bits() + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if mass(f32::from_bits(mid)) >= target { lo = mid } else { hi = mid }
        }
        tau = f32::from_bits(lo);
    }
    let total: f32 = w.iter().filter(|&&x| x >= tau).sum();
    let target = s.u * total;
    let (mut run, mut last) = (0f32, argmax);
    for (i, &x) in w.iter().enumerate() {
        // Weights that underflowed to 0 are never picked, not even as the fallback.
        if x >= tau && x > 0.0 {
            run += x;
            last = i;
            if run > target {
                return i as u32;
            }
        }
    }
    last as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn row(temperature: f32, top_k: usize, top_p: f32, min_p: f32, u: f32) -> RowSampling {
        RowSampling { temperature, top_k, top_p, min_p, u }
    }

    /// Frequency of each id over an even sweep of u.
    fn frequencies(logits: &[f32], s: RowSampling, draws: usize) -> Vec<f64> {
        let mut n = vec![0f64; logits.len()];
        for d in 0..draws {
            let u = (d as f32 + 0.5) / draws as f32;
            n[sample_row(logits, &RowSampling { u, ..s }) as usize] += 1.0 / draws as f64;
        }
        n
    }

    #[test]
    fn greedy_is_the_first_argmax() {
        let logits = [0.5f32, 3.0, -1.0, 3.0, 2.9];
        assert_eq!(sample_row(&logits, &RowSampling::greedy()), 1);
        // top_k = 1 is greedy at any temperature and draw (without a tie for the top).
        let logits = [0.5f32, 3.0, -1.0, 2.95, 2.9];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample_row(&logits, &row(1.5, 1, 1.0, 0.0, u)), 1);
        }
    }

    #[test]
    fn untruncated_sampling_follows_the_softmax() {
        let logits = [1.0f32, 2.0, 0.0, 3.0];
        let t = 0.7f32;
        let z: f64 = logits.iter().map(|&l| ((l / t) as f64).exp()).sum();
        let f = frequencies(&logits, row(t, 0, 1.0, 0.0, 0.0), 100_000);
        for (i, &l) in logits.iter().enumerate() {
            let p = ((l / t) as f64).exp() / z;
            assert!((f[i] - p).abs() < 1e-3, "id {i}: {} vs {p}", f[i]);
        }
    }

    #[test]
    fn truncation_keeps_exactly_the_allowed_tokens() {
        // Weights at temperature 1: 1, e^-1, e^-2, e^-3, e^-4 (ids 2, 0, 4, 1, 3).
        let logits = [3.0f32, 1.0, 4.0, 0.0, 2.0];
        let kept = |s: RowSampling| {
            let f = frequencies(&logits, s, 20_000);
            (0..logits.len()).filter(|&i| f[i] > 0.0).collect::<Vec<_>>()
        };
        assert_eq!(kept(row(1.0, 2, 1.0, 0.0, 0.0)), vec![0, 2]);
        assert_eq!(kept(row(1.0, 3, 1.0, 0.0, 0.0)), vec![0, 2, 4]);
        // min_p 0.3 keeps weights >= 0.3: 1 and e^-1 = 0.37.
        assert_eq!(kept(row(1.0, 0, 1.0, 0.3, 0.0)), vec![0, 2]);
        // Masses: 1, 0.37, 0.14, 0.05, 0.02 of 1.58; top_p 0.7 needs 1.10 -> two tokens,
        // top_p 0.9 needs 1.42 -> three.
        assert_eq!(kept(row(1.0, 0, 0.7, 0.0, 0.0)), vec![0, 2]);
        assert_eq!(kept(row(1.0, 0, 0.9, 0.0, 0.0)), vec![0, 2, 4]);
        // top_p applies to what top_k kept: of {1, 0.37}, 0.6 of 1.37 = 0.82 -> the top alone.
        assert_eq!(kept(row(1.0, 2, 0.6, 0.0, 0.0)), vec![2]);
        // Kept tokens share the mass in proportion to their weights.
        let f = frequencies(&logits, row(1.0, 2, 1.0, 0.0, 0.0), 100_000);
        let p0 = (-1f64).exp() / (1.0 + (-1f64).exp());
        assert!((f[0] - p0).abs() < 1e-3, "{} vs {p0}", f[0]);
    }

    #[test]
    fn the_rounding_fallback_never_picks_an_underflowed_token() {
        // exp(-1000) is 0 in f32: ids 1 and 3 have no mass. u = 1 stands for a draw whose
        // target rounds up to the whole mass, where only the fallback answers.
        let logits = [0.0f32, -1000.0, 5.0, -1000.0];
        assert_eq!(sample_row(&logits, &row(1.0, 0, 1.0, 0.0, 1.0)), 2);
        assert_eq!(sample_row(&logits, &row(1.0, 0, 1.0, 0.0, 0.0)), 0);
    }

    #[test]
    fn ties_at_the_threshold_are_all_kept() {
        let logits = [1.0f32, 5.0, 1.0, 1.0];
        let f = frequencies(&logits, row(100.0, 2, 1.0, 0.0, 0.0), 10_000);
        assert!(f.iter().all(|&x| x > 0.0), "{f:?}");
    }

    #[test]
    fn rows_use_their_own_settings() {
        let mut rng = StdRng::seed_from_u64(7);
        let vocab = 1000;
        let logits: Vec<f32> = (0..3 * vocab).map(|_| rng.random::<f32>() * 8.0).collect();
        let rows = [RowSampling::greedy(), row(1.0, 1, 1.0, 0.0, 0.9), row(0.8, 50, 0.9, 0.05, 0.3)];
        let ids = sample_rows_reference(&logits, vocab, &rows);
        for (r, &id) in ids.iter().enumerate() {
            assert_eq!(id, sample_row(&logits[r * vocab..(r + 1) * vocab], &rows[r]));
        }
        let argmax1 = (0..vocab).max_by(|&a, &b| logits[vocab + a].total_cmp(&logits[vocab + b])).unwrap();
        assert_eq!(ids[1] as usize, argmax1);
        // The tensor entry point agrees on CPU.
        let t = Tensor::from_vec(logits.clone(), (3, vocab), &Device::Cpu).unwrap();
        assert_eq!(sample_rows(&t, &rows).unwrap(), ids);
        assert!(sample_rows(&t, &rows[..2]).is_err());
    }
}
