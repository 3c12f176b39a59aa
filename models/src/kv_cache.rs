//! The paged KV cache tensors. Which blocks belong to which sequence is the engine's
//! business (its block pool); this is only the storage, sized once at start-up.

use candle_core::{DType, Device, Tensor};
use ragnode_kernels::attention::{key_cache_shape, value_cache_shape};

use crate::error::Result;

/// What a model needs cached per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheLayout {
    /// Bytes one token occupies across all layers (K and V).
    pub fn bytes_per_token(&self, dtype: DType) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.size_in_bytes()
    }
}

/// Per-layer K and V tensors in the layouts of `ragnode_kernels::attention` (keys
/// `[num_blocks, num_kv_heads, head_dim, block_size]`, values `[num_blocks, num_kv_heads,
/// block_size, head_dim]`).
pub struct PagedKvCache {
    layers: Vec<(Tensor, Tensor)>,
    layout: KvCacheLayout,
    num_blocks: usize,
    block_size: usize,
    dtype: DType,
}

impl PagedKvCache {
    pub fn new(
        layout: KvCacheLayout,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (nkv, hd) = (layout.num_kv_heads, layout.head_dim);
        let kshape = key_cache_shape(num_blocks, nkv, block_size, hd);
        let vshape = value_cache_shape(num_blocks, nkv, block_size, hd);
        let layers = (0..layout.num_layers)
            .map(|_| Ok((Tensor::zeros(&kshape, dtype, device)?, Tensor::zeros(&vshape, dtype, device)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, layout, num_blocks, block_size, dtype })
    }

    /// Number of blocks that fit in `budget_bytes`.
    pub fn blocks_for_budget(layout: KvCacheLayout, block_size: usize, dtype: DType, budget_bytes: usize) -> usize {
        budget_bytes / (layout.bytes_per_token(dtype) * block_size).max(1)
    }

    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[i];
        (k, v)
    }

    pub fn layout(&self) -> KvCacheLayout {
        self.layout
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn size_in_bytes(&self) -> usize {
        self.layout.bytes_per_token(self.dtype) * self.block_size * self.num_blocks
    }
}
