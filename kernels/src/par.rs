//! Sharing work between the calling thread and candle's barrier pool (the same
//! spin-then-park threads the quantized matmul uses, so ops never oversubscribe the cores).

/// Work below this many output elements runs on the calling thread: waking the pool costs
/// more than it saves.
pub(crate) const PARALLEL_MIN: usize = 1 << 13;

/// A raw output pointer shared by workers that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);
// SAFETY: users only write disjoint ranges, each from one worker.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    // A method (not `.0`) so closures capture the Sync wrapper, not the raw pointer.
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Runs `f(row, out_row)` for `rows` rows of `width` outputs each, on the pool when large.
pub(crate) fn for_rows(rows: usize, width: usize, out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    assert!(out.len() >= rows * width, "for_rows: output too small");
    let ptr = SharedOut::new(out);
    let run = |range: std::ops::Range<usize>| {
        for r in range {
            // SAFETY: in bounds (checked above); each row is written by exactly one call.
            f(r, unsafe { std::slice::from_raw_parts_mut(ptr.get().add(r * width), width) });
        }
    };
    if rows * width < PARALLEL_MIN || rows < 2 {
        run(0..rows);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(rows, run);
    }
}

/// Runs `f` on a CPU f32 tensor's elements in place (no copy when it is contiguous).
pub(crate) fn with_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => candle_core::bail!("expected a contiguous f32 CPU tensor, got {:?} on {:?}", t.dtype(), t.device()),
    }
}
