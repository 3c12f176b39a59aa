//! Matmul driver: quantizes the activations, splits the output tiles among the threads of
//! candle's barrier pool and runs the selected kernel on each part.
//!
//! Partitioning never changes a result: every output element is one kernel's full pass
//! over `k` with a fixed per-block operation order, whichever rows and tiles share the call.

use super::Kernel;
use super::acts::{self, ActKind, ActRowsMut, QActs};
use super::layout::{Format, Packed};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Raw, shared view of the output `y[m][n]` that workers write disjoint pieces of.
pub(crate) struct OutPtr<'a> {
    ptr: *mut f32,
    m: usize,
    n: usize,
    _y: PhantomData<&'a mut [f32]>,
}

// SAFETY: workers only write through `write`, whose contract forbids overlapping writes.
unsafe impl Send for OutPtr<'_> {}
unsafe impl Sync for OutPtr<'_> {}

impl<'a> OutPtr<'a> {
    /// `y` must hold at least `m * n` elements (checked).
    pub(crate) fn new(y: &'a mut [f32], m: usize, n: usize) -> Self {
        assert!(y.len() >= m * n, "output buffer too small");
        Self { ptr: y.as_mut_ptr(), m, n, _y: PhantomData }
    }

    /// Writes `vals` to `y[row, col..col + vals.len()]`.
    ///
    /// # Safety
    /// `row < m`, `col + vals.len() <= n`, and no other thread reads or writes these
    /// elements during the call that owns this `OutPtr`.
    #[inline]
    pub(crate) unsafe fn write(&self, row: usize, col: usize, vals: &[f32]) {
        debug_assert!(row < self.m && col + vals.len() <= self.n);
        // SAFETY: in bounds by the contract above; the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.ptr.add(row * self.n + col), vals.len()) };
    }
}

/// Register blocking of the SIMD kernels, tunable at run time for benchmarking.
pub(crate) struct Tuning {
    /// Activation rows per micro-kernel call when `m > SMALL_M`.
    pub(crate) rows: AtomicUsize,
    /// Tiles (of 16 columns) per micro-kernel call when `m > SMALL_M`.
    pub(crate) tiles: AtomicUsize,
    /// Tiles per micro-kernel call when `m == 1`.
    pub(crate) tiles_m1: AtomicUsize,
    /// Work items per thread (1: one contiguous range each; more: handed out dynamically).
    pub(crate) parts_per_thread: AtomicUsize,
}

pub(crate) static TUNING: Tuning = Tuning {
    rows: AtomicUsize::new(4),
    tiles: AtomicUsize::new(4),
    tiles_m1: AtomicUsize::new(1),
    parts_per_thread: AtomicUsize::new(1),
};

/// Rows of activations per outer chunk: keeps one chunk's quantized rows in L1/L2 while a
/// thread walks its tiles.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const ROW_CHUNK: usize = 64;

/// How a part of the output is computed: rows × tiles, on one thread.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Blocking {
    pub(crate) rows: usize,
    pub(crate) tiles: usize,
}

impl Blocking {
    /// Up to 8 rows, a few rows are memory-bound: one tile at a time keeps each thread's
    /// weight reads a single sequential stream (interleaving tiles measured 30-40% slower
    /// at m = 1..4). Beyond that the kernels are compute-bound and 4 rows × 4 tiles (each
    /// weight vector reused 4×, each activation broadcast 4×) measured best: Q8_0 m = 16
    /// 384 vs 291 GFLOP/s for 4 × 2, Q4_1 389 vs 339.
    fn for_m(m: usize) -> Self {
        if m == 1 {
            Self { rows: 1, tiles: TUNING.tiles_m1.load(Ordering::Relaxed).clamp(1, 4) }
        } else if m <= SMALL_M {
            Self { rows: m, tiles: 1 }
        } else {
            Self {
                rows: TUNING.rows.load(Ordering::Relaxed).clamp(1, 8),
                tiles: TUNING.tiles.load(Ordering::Relaxed).clamp(1, 4),
            }
        }
    }
}

impl Blocking {
    /// Walks `rows × tiles` in chunks of [`ROW_CHUNK`] rows, groups of `self.tiles`
    /// tiles and groups of up to `min(self.rows, max_rows)` rows, calling
    /// `call(rn, tn, r, t)` for `rn` rows from `r` × `tn` tiles from `t`, where
    /// `tn = tiles_per_call(rn, tiles left in the group)` (what the kernel for `rn` rows
    /// supports).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn walk(
        self,
        rows: Range<usize>,
        tiles: Range<usize>,
        max_rows: usize,
        tiles_per_call: impl Fn(usize, usize) -> usize,
        mut call: impl FnMut(usize, usize, usize, usize),
    ) {
        let row_group = self.rows.clamp(1, max_rows);
        let mut rc = rows.start;
        while rc < rows.end {
            let rc_end = rows.end.min(rc + ROW_CHUNK);
            let mut t = tiles.start;
            while t < tiles.end {
                let t_end = tiles.end.min(t + self.tiles.max(1));
                let mut r = rc;
                while r < rc_end {
                    let rn = row_group.min(rc_end - r);
                    let mut tt = t;
                    while tt < t_end {
                        let tn = tiles_per_call(rn, t_end - tt).max(1);
                        call(rn, tn, r, tt);
                        tt += tn;
                    }
                    r += rn;
                }
                t = t_end;
            }
            rc = rc_end;
        }
    }
}

/// Batches up to this many rows run as one row group over single tiles.
const SMALL_M: usize = 8;

pub(crate) fn act_kind(format: Format) -> ActKind {
    match format {
        Format::Q4_1 | Format::Q5_1 => ActKind::Q8_1,
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => ActKind::Q8_0,
        Format::Q4K | Format::Q5K | Format::Q6K => ActKind::Q8K,
    }
}

/// Threads of candle's barrier pool (its workers plus the calling thread).
pub(crate) fn pool_threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f(part)` for `part` in `0..parts` on the pool. `execute_chunked` hands out one
/// part per grab here and runs inline when called from inside a pool worker.
fn for_each_part(parts: usize, f: impl Fn(usize) + Sync) {
    if parts <= 1 {
        f(0);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(parts, |range| {
        for part in range {
            f(part);
        }
    });
}

/// `0..len` cut into `parts` near-equal contiguous ranges.
fn split(len: usize, parts: usize, i: usize) -> Range<usize> {
    let (q, r) = (len / parts, len % parts);
    let start = i * q + i.min(r);
    start..start + q + usize::from(i < r)
}

thread_local! {
    /// Quantized activations of the calling thread, reused across calls.
    static SCRATCH: RefCell<QActs> = RefCell::new(QActs::default());
}

/// `y[m×n] = x[m×k] · Wᵀ`; sizes are validated by the caller.
pub(crate) fn matmul(p: &Packed, x: &[f32], m: usize, y: &mut [f32], kernel: Kernel, parallel: bool) {
    if m == 0 {
        return;
    }
    // Even small matrices gain from both cores' memory bandwidth (measured: one core
    // streams ~27 GB/s, two ~35 GB/s), so every call uses the pool.
    let threads = if parallel { pool_threads() } else { 1 };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut acts) => run(p, x, m, y, kernel, threads, &mut acts),
        // Re-entered on this thread (cannot happen through the public API): fresh scratch.
        Err(_) => run(p, x, m, y, kernel, threads, &mut QActs::default()),
    });
}

fn run(p: &Packed, x: &[f32], m: usize, y: &mut [f32], kernel: Kernel, threads: usize, acts: &mut QActs) {
    quantize(x, m, p, kernel, threads, acts);
    let acts = &*acts;
    let out = OutPtr::new(y, m, p.n);
    let blocking = Blocking::for_m(m);
    let parts = (threads * TUNING.parts_per_thread.load(Ordering::Relaxed).max(1)).min(p.n_tiles);
    for_each_part(parts, |part| {
        let tiles = split(p.n_tiles, parts, part);
        // SAFETY: the kernel was checked available by the caller; the parts' tile ranges
        // are disjoint, so no output element is written twice.
        unsafe { run_part(kernel, p, acts, 0..m, tiles, &out, blocking) };
    });
}

/// # Safety
/// `kernel` is available on this CPU, `rows ⊆ 0..acts.m`, `tiles ⊆ 0..p.n_tiles`, and no
/// other thread writes the same (row, tile) outputs.
unsafe fn run_part(
    kernel: Kernel,
    p: &Packed,
    a: &QActs,
    rows: Range<usize>,
    tiles: Range<usize>,
    y: &OutPtr,
    blocking: Blocking,
) {
    match kernel {
        Kernel::Scalar => super::scalar::run(p, a, rows, tiles, y),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from this function's contract.
        Kernel::Avx2 => unsafe { super::x86::run_avx2(p, a, rows, tiles, y, blocking) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from this function's contract.
        Kernel::Avx512Vnni => unsafe { super::x86::run_avx512(p, a, rows, tiles, y, blocking) },
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Avx2 | Kernel::Avx512Vnni => {
            let _ = blocking;
            super::scalar::run(p, a, rows, tiles, y)
        }
    }
}

/// Quantizes `x` into `acts` (rows split among threads when there are many).
fn quantize(x: &[f32], m: usize, p: &Packed, kernel: Kernel, threads: usize, acts: &mut QActs) {
    let kind = act_kind(p.format);
    let k = p.k;
    acts.reset(m, p.nb, kind);
    // Small inputs run on the calling thread: a hand-off costs more than the work.
    let parts = if m * k >= crate::par::PARALLEL_MIN { threads.min(m) } else { 1 };
    let quantize_part = |rows: Range<usize>, out: ActRowsMut<'_>| {
        let xs = &x[rows.start * k..rows.end * k];
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F/BW availability is implied by the checked `Avx512Vnni`.
            Kernel::Avx512Vnni => unsafe { super::x86::quantize_rows_avx512(xs, kind, out) },
            _ => acts::quantize_rows_scalar(xs, kind, out),
        }
    };
    if parts == 1 {
        quantize_part(0..m, acts.rows_mut(0..m));
        return;
    }
    let mut pieces = Vec::with_capacity(parts);
    let mut rest = acts.rows_mut(0..m);
    let mut start = 0;
    for i in 0..parts {
        let rows = split(m, parts, i);
        let (head, tail) = rest.split_at(rows.len(), p.nb);
        pieces.push(Mutex::new(Some((start..start + rows.len(), head))));
        start += rows.len();
        rest = tail;
    }
    for_each_part(parts, |i| {
        let piece = pieces[i].lock().ok().and_then(|mut g| g.take());
        if let Some((rows, out)) = piece {
            quantize_part(rows, out);
        }
    });
}
