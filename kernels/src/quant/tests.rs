//! Kernels vs candle (`QTensor` quantization, `QMatMul`, `dequantize`) and vs each other.
//!
//! Tolerances: every kernel (scalar / AVX2 / AVX-512) must give the *same bits*; Q4_1 must
//! give candle's bits (candle's Q4_1 × Q8_1 dot product is the same scalar loop); Q4_0 and
//! Q8_0 must be within `1e-5 · max|y|` of candle (its AVX dot products only sum in another
//! order); and all must be within the Q8 activation-rounding bound of an f64 matmul on
//! dequantized weights and unquantized activations.

use super::acts::{self, ActKind, QActs};
use super::*;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FORMATS: [GgmlDType; 8] = [
    GgmlDType::Q4_1,
    GgmlDType::Q4_0,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// A few `k` values valid for `dtype` (the block size and up).
fn ks(dtype: GgmlDType) -> [usize; 3] {
    if dtype.block_size() == 256 { [256, 512, 1536] } else { [32, 96, 576] }
}

fn randn(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    // Sum of uniforms: roughly normal, plus a few outliers like real activations.
    (0..len)
        .map(|_| {
            let v: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum();
            if rng.random::<f32>() < 0.01 { v * 20.0 * scale } else { v * scale }
        })
        .collect()
}

/// A random `[n, k]` matrix quantized by candle: (candle tensor, GGML bytes).
fn random_weights(rng: &mut StdRng, dtype: GgmlDType, n: usize, k: usize) -> (QTensor, Vec<u8>) {
    let w = randn(rng, n * k, 0.1);
    let t = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let bytes = q.data().unwrap().into_owned();
    (q, bytes)
}

fn matrix(dtype: GgmlDType, bytes: &[u8], n: usize, k: usize) -> QuantMatrix {
    QuantMatrix::from_ggml(dtype, bytes, n, k).unwrap().unwrap()
}

fn candle_matmul(q: QTensor, x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mm = QMatMul::from_qtensor(q).unwrap();
    let xt = Tensor::from_vec(x.to_vec(), (m, k), &Device::Cpu).unwrap();
    mm.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn run(w: &QuantMatrix, x: &[f32], m: usize, kernel: Kernel, parallel: bool) -> Vec<f32> {
    let mut y = vec![f32::NAN; m * w.rows()];
    w.matmul_with(x, m, &mut y, MatmulOptions { kernel, parallel }).unwrap();
    y
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, &b| a.max(b.abs()))
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = rel * max_abs(want).max(1e-6);
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    eprintln!("{what}: max |diff| / max |y| = {:.2e}", worst / max_abs(want).max(1e-6));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}: [{i}] {g} vs {w} (tol {tol})");
    }
}

/// Checks `got` against an f64 `x · Wᵀ` on candle's dequantized weights, allowing per
/// element the activation rounding bound `Σ_blocks amax/254 · Σ|w|` plus `2⁻⁹ · Σ|x·w|`
/// (f16 scales).
fn check_vs_dequantized(got: &[f32], q: &QTensor, x: &[f32], m: usize, n: usize, k: usize, what: &str) {
    let w: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mut bound = 1e-6;
            let qk = q.dtype().block_size();
            for (xb, wb) in xr.chunks(qk).zip(wr.chunks(qk)) {
                let amax = xb.iter().fold(0f64, |a, &b| a.max(b.abs() as f64));
                bound += amax / 254.0 * wb.iter().map(|&v| v.abs() as f64).sum::<f64>();
                bound += xb.iter().zip(wb).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>() / 512.0;
            }
            let g = got[i * n + j] as f64;
            assert!((g - exact).abs() <= bound, "{what}: [{i}, {j}] {g} vs {exact} (bound {bound})");
        }
    }
}

#[test]
fn activation_quantization_matches_candle() {
    let mut rng = StdRng::seed_from_u64(1);
    let kinds = [(ActKind::Q8_0, GgmlDType::Q8_0), (ActKind::Q8_1, GgmlDType::Q8_1), (ActKind::Q8K, GgmlDType::Q8K)];
    for (kind, dtype) in kinds {
        let k = 256 * 5;
        let mut x = randn(&mut rng, k, 3.0);
        x[..32].fill(0.0); // all-zero block: d = 0
        x[256..512].fill(0.0); // all-zero K block
        for v in &mut x[32..64] {
            *v *= 1e-30; // tiny scales
        }
        // Exact .5 ties after scaling: amax 127 makes id = 1.
        x[64] = 127.0;
        x[65] = 2.5;
        x[66] = -3.5;
        x[67] = -0.5;
        // Largest magnitude twice with both signs: the first one sets Q8_K's sign.
        x[600] = -50.0;
        x[700] = 50.0;
        let t = Tensor::from_vec(x.clone(), k, &Device::Cpu).unwrap();
        let want = QTensor::quantize(&t, dtype).unwrap().data().unwrap().into_owned();
        let block = kind.block_len();
        let block_bytes = want.len() / (k / block);
        for kernel in Kernel::available() {
            let mut a = QActs::default();
            a.reset(1, k / block, kind);
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512Vnni => unsafe { x86::quantize_rows_avx512(&x, kind, a.rows_mut(0..1)) },
                _ => acts::quantize_rows_scalar(&x, kind, a.rows_mut(0..1)),
            }
            for (b, blk) in want.chunks_exact(block_bytes).enumerate() {
                let le16 = |i: usize| u16::from_le_bytes([blk[i], blk[i + 1]]);
                let (d, qs_at) = match kind {
                    ActKind::Q8K => (f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]), 4),
                    _ => (half::f16::from_bits(le16(0)).to_f32(), block_bytes - 32),
                };
                assert_eq!(a.d[b].to_bits(), d.to_bits(), "{kernel:?} {dtype:?} d[{b}]");
                if kind == ActKind::Q8_1 {
                    let s = half::f16::from_bits(le16(2));
                    assert_eq!(a.s[b].to_bits(), s.to_f32().to_bits(), "{kernel:?} s[{b}]");
                }
                let qs: Vec<i8> = blk[qs_at..qs_at + block].iter().map(|&v| v as i8).collect();
                assert_eq!(&a.qs[b * block..(b + 1) * block], &qs[..], "{kernel:?} {dtype:?} qs[{b}]");
                assert_eq!(a.sum[b], qs.iter().map(|&q| q as i32).sum::<i32>());
                if kind == ActKind::Q8K {
                    for j in 0..16 {
                        assert_eq!(a.sub[b * 16 + j], le16(4 + 256 + 2 * j) as i16 as i32, "bsums[{j}]");
                    }
                }
            }
        }
    }
}

#[test]
fn ggml_roundtrip_and_dequantize_match_candle() {
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in FORMATS {
        let [k0, k1, k2] = ks(dtype);
        for (n, k) in [(1, k0), (17, k1), (40, k0), (33, k2)] {
            let (q, bytes) = random_weights(&mut rng, dtype, n, k);
            let w = matrix(dtype, &bytes, n, k);
            assert_eq!((w.rows(), w.cols(), w.dtype()), (n, k, dtype));
            assert_eq!(w.to_ggml(), bytes, "{dtype:?} roundtrip");
            let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let mut row = vec![0f32; k + 3];
            for r in 0..n {
                w.dequantize_row(r, &mut row).unwrap();
                assert_eq!(bits(&row[..k]), bits(&want[r * k..(r + 1) * k]), "{dtype:?} row {r}");
            }
            let ids = [0u32, (n - 1) as u32, 0];
            let emb = quant_embedding(&ids, &w).unwrap();
            for (i, &id) in ids.iter().enumerate() {
                let r = id as usize;
                assert_eq!(bits(&emb[i * k..(i + 1) * k]), bits(&want[r * k..(r + 1) * k]));
            }
            assert!(w.size_in_bytes() >= bytes.len());
        }
    }
}

#[test]
fn matmul_all_kernels_match_candle_and_reference() {
    let mut rng = StdRng::seed_from_u64(3);
    let kernels = Kernel::available();
    eprintln!("kernels under test: {kernels:?}");
    for dtype in FORMATS {
        let [k0, k1, k2] = ks(dtype);
        for (n, k) in [(1, k0), (16, k1), (33, k0), (100, k2), (48, k1)] {
            for m in [1, 3, 17, 64] {
                let (q, bytes) = random_weights(&mut rng, dtype, n, k);
                let w = matrix(dtype, &bytes, n, k);
                let x = randn(&mut rng, m * k, 1.0);
                let want = run(&w, &x, m, Kernel::Scalar, false);
                for &kernel in &kernels {
                    for parallel in [false, true] {
                        let got = run(&w, &x, m, kernel, parallel);
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{dtype:?} {kernel:?} parallel={parallel} m={m} n={n} k={k}"
                        );
                    }
                }
                check_vs_dequantized(&want, &q, &x, m, n, k, &format!("{dtype:?} m={m} n={n} k={k}"));
                let candle = candle_matmul(q, &x, m, k);
                let what = format!("{dtype:?} m={m} n={n} k={k}");
                if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q5_0) {
                    // candle's Q4_1/Q5_0/Q5_1 dot products are the same scalar loop.
                    assert_eq!(bits(&want), bits(&candle), "{what}: candle bits");
                } else {
                    assert_close(&want, &candle, 1e-5, &format!("{what} vs candle"));
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_batching_or_threads() {
    let mut rng = StdRng::seed_from_u64(4);
    let m = 37;
    for dtype in FORMATS {
        let k = ks(dtype)[1];
        let n = 16 * 7 + 5;
        let (_, bytes) = random_weights(&mut rng, dtype, n, k);
        let w = matrix(dtype, &bytes, n, k);
        let x = randn(&mut rng, m * k, 1.0);
        for kernel in Kernel::available() {
            let full = bits(&run(&w, &x, m, kernel, true));
            assert_eq!(full, bits(&run(&w, &x, m, kernel, false)));
            for i in 0..m {
                let alone = run(&w, &x[i * k..(i + 1) * k], 1, kernel, true);
                assert_eq!(bits(&alone), full[i * n..(i + 1) * n], "{dtype:?} {kernel:?} row {i} alone");
            }
            for batch in [2, 3, 5, 8, 9, 16] {
                for start in (0..m).step_by(batch) {
                    let rows = batch.min(m - start);
                    let got = run(&w, &x[start * k..(start + rows) * k], rows, kernel, true);
                    assert_eq!(
                        bits(&got),
                        full[start * n..(start + rows) * n],
                        "{dtype:?} {kernel:?} rows {start}..+{rows}"
                    );
                }
            }
        }
        // Other register blockings give the same bits too.
        let saved = (
            exec::TUNING.rows.load(std::sync::atomic::Ordering::Relaxed),
            exec::TUNING.tiles.load(std::sync::atomic::Ordering::Relaxed),
        );
        let best = Kernel::best();
        let want = bits(&run(&w, &x, m, best, true));
        for (r, t) in [(1, 1), (2, 4), (3, 2), (8, 1), (5, 3)] {
            exec::TUNING.rows.store(r, std::sync::atomic::Ordering::Relaxed);
            exec::TUNING.tiles.store(t, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(bits(&run(&w, &x, m, best, true)), want, "{dtype:?} blocking {r}x{t}");
        }
        exec::TUNING.rows.store(saved.0, std::sync::atomic::Ordering::Relaxed);
        exec::TUNING.tiles.store(saved.1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn concat_rows_stacks_outputs() {
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in FORMATS {
        let k = ks(dtype)[1];
        let parts: Vec<(usize, Vec<u8>)> =
            [20, 16, 7].into_iter().map(|n| (n, random_weights(&mut rng, dtype, n, k).1)).collect();
        let mats: Vec<QuantMatrix> = parts.iter().map(|(n, b)| matrix(dtype, b, *n, k)).collect();
        let fused = QuantMatrix::concat_rows(&mats.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(fused.rows(), 43);
        let all: Vec<u8> = parts.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(fused.to_ggml(), all);
        let m = 5;
        let x = randn(&mut rng, m * k, 1.0);
        let y = run(&fused, &x, m, Kernel::best(), true);
        let mut col = 0;
        for w in &mats {
            let yp = run(w, &x, m, Kernel::best(), true);
            for i in 0..m {
                assert_eq!(
                    bits(&yp[i * w.rows()..(i + 1) * w.rows()]),
                    bits(&y[i * 43 + col..i * 43 + col + w.rows()])
                );
            }
            col += w.rows();
        }
    }
    // Mismatches are errors.
    let a = matrix(GgmlDType::Q4_1, &random_weights(&mut rng, GgmlDType::Q4_1, 4, 64).1, 4, 64);
    let b = matrix(GgmlDType::Q4_1, &random_weights(&mut rng, GgmlDType::Q4_1, 4, 96).1, 4, 96);
    let c = matrix(GgmlDType::Q8_0, &random_weights(&mut rng, GgmlDType::Q8_0, 4, 64).1, 4, 64);
    assert!(matches!(QuantMatrix::concat_rows(&[&a, &b]), Err(QuantError::Concat(_))));
    assert!(matches!(QuantMatrix::concat_rows(&[&a, &c]), Err(QuantError::Concat(_))));
    assert!(matches!(QuantMatrix::concat_rows(&[]), Err(QuantError::Concat(_))));
}

#[test]
fn bad_input_is_an_error() {
    let mut rng = StdRng::seed_from_u64(6);
    let (_, bytes) = random_weights(&mut rng, GgmlDType::Q4_1, 4, 64);
    assert!(QuantMatrix::from_ggml(GgmlDType::Q2K, &[], 1, 256).unwrap().is_none());
    assert!(QuantMatrix::from_ggml(GgmlDType::F32, &[], 1, 1).unwrap().is_none());
    let err = |r: Result<Option<QuantMatrix>, QuantError>| r.err().map(|e| e.to_string());
    assert!(err(QuantMatrix::from_ggml(GgmlDType::Q4_1, &bytes[1..], 4, 64)).is_some());
    assert!(err(QuantMatrix::from_ggml(GgmlDType::Q4_1, &bytes, 4, 60)).is_some());
    assert!(err(QuantMatrix::from_ggml(GgmlDType::Q4_1, &bytes, 0, 64)).is_some());
    assert!(err(QuantMatrix::from_ggml(GgmlDType::Q4_1, &bytes, 4, 0)).is_some());
    assert!(err(QuantMatrix::from_ggml(GgmlDType::Q4_1, &bytes, usize::MAX, 64)).is_some());
    let w = matrix(GgmlDType::Q4_1, &bytes, 4, 64);
    let mut y = vec![0f32; 8];
    assert!(w.matmul(&[0.0; 127], 2, &mut y).is_err());
    assert!(w.matmul(&[0.0; 128], 2, &mut y[..7]).is_err());
    assert!(w.matmul(&[0.0; 128], usize::MAX, &mut y).is_err());
    assert!(w.matmul(&[], 0, &mut []).is_ok());
    assert!(w.dequantize_row(4, &mut [0.0; 64]).is_err());
    assert!(w.dequantize_row(0, &mut [0.0; 63]).is_err());
    assert!(quant_embedding(&[4], &w).is_err());
    for kernel in [Kernel::Avx2, Kernel::Avx512Vnni] {
        let r = w.matmul_with(&[0.0; 128], 2, &mut y, MatmulOptions { kernel, parallel: true });
        assert_eq!(r.is_ok(), kernel.is_available());
    }
}

#[test]
fn candle_op_matches_matmul() {
    let mut rng = StdRng::seed_from_u64(7);
    let (n, k) = (40, 96);
    let (_, bytes) = random_weights(&mut rng, GgmlDType::Q4_1, n, k);
    let w = Arc::new(matrix(GgmlDType::Q4_1, &bytes, n, k));
    let x = randn(&mut rng, 6 * k, 1.0);
    let mut want = vec![0f32; 6 * n];
    w.matmul(&x, 6, &mut want).unwrap();
    let xt = Tensor::from_vec(x.clone(), (2, 3, k), &Device::Cpu).unwrap();
    let y = quant_matmul(&xt, &w).unwrap();
    assert_eq!(y.dims(), &[2, 3, n]);
    assert_eq!(bits(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap()), bits(&want));
    // A non-contiguous view is made contiguous first.
    let xt_t =
        Tensor::from_vec(x.clone(), (6, k), &Device::Cpu).unwrap().t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!xt_t.is_contiguous());
    let y = quant_matmul(&xt_t, &w).unwrap();
    assert_eq!(bits(&y.flatten_all().unwrap().to_vec1::<f32>().unwrap()), bits(&want));
    // 1-D input.
    let y1 = quant_matmul(&Tensor::from_vec(x[..k].to_vec(), k, &Device::Cpu).unwrap(), &w).unwrap();
    assert_eq!(y1.dims(), &[n]);
    assert_eq!(bits(&y1.to_vec1::<f32>().unwrap()), bits(&want[..n]));
    // Wrong dtype / width.
    assert!(quant_matmul(&xt.to_dtype(DType::F16).unwrap(), &w).is_err());
    assert!(quant_matmul(&Tensor::zeros((2, k + 1), DType::F32, &Device::Cpu).unwrap(), &w).is_err());
}

/// Real SmolLM2 weights, when the model file is present: Q4_1 bits equal candle's.
#[test]
fn real_weights_match_candle() {
    let path = std::path::Path::new(&std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
        .join(".cache/ragnode/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let Ok(mut file) = std::fs::File::open(&path) else {
        eprintln!("skipping: {} not found", path.display());
        return;
    };
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    for name in ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"] {
        let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let (n, k) = q.shape().dims2().unwrap();
        let dtype = q.dtype();
        let w = matrix(dtype, &q.data().unwrap(), n, k);
        let m = 3;
        let x = randn(&mut rng, m * k, 1.0);
        let got = run(&w, &x, m, Kernel::best(), true);
        let candle = candle_matmul(q, &x, m, k);
        if dtype == GgmlDType::Q4_1 {
            assert_eq!(bits(&got), bits(&candle), "{name}");
        } else {
            assert_close(&got, &candle, 1e-5, name);
        }
    }
}

/// Timing harness (not a test): `QB_M=16 QB_FMT=q8_0 QB_VARIANTS='4,2;4,4'`.
#[test]
#[ignore]
fn bench_variants() {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let ms: Vec<usize> = env("QB_M", "16").split(',').map(|v| v.parse().unwrap()).collect();
    let fmt = env("QB_FMT", "q8_0");
    let (dtype, n, k) = match fmt.as_str() {
        "q8_0" => (GgmlDType::Q8_0, 49152, 576),
        "q4_1" => (GgmlDType::Q4_1, 3072, 576),
        "q4_1d" => (GgmlDType::Q4_1, 576, 1536),
        _ => panic!("fmt"),
    };
    let hot = env("QB_HOT", "0") == "1";
    let variants: Vec<Vec<usize>> =
        env("QB_VARIANTS", "4,4").split(';').map(|v| v.split(',').map(|x| x.parse().unwrap()).collect()).collect();
    let mut rng = StdRng::seed_from_u64(9);
    let (_, bytes) = random_weights(&mut rng, dtype, n, k);
    let w = matrix(dtype, &bytes, n, k);
    let copies = if hot { 1 } else { (256usize << 20).div_ceil(w.size_in_bytes()) };
    let ws: Vec<QuantMatrix> = (0..copies).map(|_| w.clone()).collect();
    let rounds: usize = env("QB_ROUNDS", "7").parse().unwrap();
    for &m in &ms {
        let x = randn(&mut rng, m * k, 1.0);
        let mut y = vec![0f32; m * n];
        let mut times = vec![Vec::new(); variants.len()];
        for _ in 0..rounds {
            for (vi, v) in variants.iter().enumerate() {
                exec::TUNING.rows.store(v[0], Relaxed);
                exec::TUNING.tiles.store(v[1], Relaxed);
                let start = Instant::now();
                let mut i = 0;
                while i < copies || start.elapsed().as_millis() < 100 {
                    ws[i % copies].matmul(&x, m, &mut y).unwrap();
                    i += 1;
                }
                times[vi].push(start.elapsed().as_secs_f64() / i as f64);
            }
        }
        for (v, mut t) in variants.iter().zip(times) {
            t.sort_by(f64::total_cmp);
            let fl = 2.0 * (m * n * k) as f64;
            eprintln!(
                "{fmt} m={m:>3} {v:?}: median {:>8.1} µs {:>6.1} GFLOP/s | best {:>8.1} µs {:>6.1} GFLOP/s",
                t[t.len() / 2] * 1e6,
                fl / t[t.len() / 2] / 1e9,
                t[0] * 1e6,
                fl / t[0] / 1e9
            );
        }
    }
    exec::TUNING.rows.store(4, Relaxed);
    exec::TUNING.tiles.store(4, Relaxed);
}
