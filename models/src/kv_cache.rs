//! The paged KV cache tensors. Which blocks belong to which sequence is the engine's
//! business (its block pool); this is only the storage, sized once at start-up.

use candle_core::{DType, Device, Tensor};
use ragnode_kernels::attention::{key_cache_shape, value_cache_shape};
use ragnode_kernels::mla::latent_cache_shape;

use crate::error::{ModelError, Result};

/// What a model needs cached per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheLayout {
    /// Keys and values per KV head (multi-head / grouped-query attention).
    PerHead { num_layers: usize, num_kv_heads: usize, head_dim: usize },
    /// One latent row per token and layer shared by every head (DeepSeek MLA:
    /// `kv_lora_rank + qk_rope_head_dim` numbers).
    Latent { num_layers: usize, latent_dim: usize },
}

impl KvCacheLayout {
    pub fn num_layers(&self) -> usize {
        match *self {
            Self::PerHead { num_layers, .. } | Self::Latent { num_layers, .. } => num_layers,
        }
    }

    /// Numbers one token occupies in one layer.
    pub fn elems_per_token_layer(&self) -> usize {
        match *self {
            Self::PerHead { num_kv_heads, head_dim, .. } => 2 * num_kv_heads * head_dim,
            Self::Latent { latent_dim, .. } => latent_dim,
        }
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(&self, dtype: DType) -> usize {
        self.num_layers() * self.elems_per_token_layer() * dtype.size_in_bytes()
    }
}

/// One layer's storage.
enum LayerCache {
    /// Keys `[num_blocks, num_kv_heads, head_dim, block_size]`, values `[num_blocks,
    /// num_kv_heads, block_size, head_dim]` (`ragnode_kernels::attention`).
    PerHead(Tensor, Tensor),
    /// `[num_blocks, block_size, latent_dim]` (`ragnode_kernels::mla`).
    Latent(Tensor),
}

/// Per-layer cache tensors in the layouts of `ragnode_kernels`.
pub struct PagedKvCache {
    layers: Vec<LayerCache>,
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
        let layers = (0..layout.num_layers())
            .map(|_| {
                Ok(match layout {
                    KvCacheLayout::PerHead { num_kv_heads: nkv, head_dim: hd, .. } => LayerCache::PerHead(
                        Tensor::zeros(key_cache_shape(num_blocks, nkv, block_size, hd), dtype, device)?,
                        Tensor::zeros(value_cache_shape(num_blocks, nkv, block_size, hd), dtype, device)?,
                    ),
                    KvCacheLayout::Latent { latent_dim, .. } => LayerCache::Latent(Tensor::zeros(
                        latent_cache_shape(num_blocks, block_size, latent_dim),
                        dtype,
                        device,
                    )?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, layout, num_blocks, block_size, dtype })
    }

    /// Number of blocks that fit in `budget_bytes`.
    pub fn blocks_for_budget(layout: KvCacheLayout, block_size: usize, dtype: DType, budget_bytes: usize) -> usize {
        budget_bytes / (layout.bytes_per_token(dtype) * block_size).max(1)
    }

    /// Layer `i`'s key and value caches (per-head layouts).
    pub fn layer(&self, i: usize) -> Result<(&Tensor, &Tensor)> {
        match self.layers.get(i) {
            Some(LayerCache::PerHead(k, v)) => Ok((k, v)),
            _ => Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "kv cache layer {i} is not a per-head layer ({:?})",
                self.layout
            )))),
        }
    }

    /// Layer `i`'s latent cache (latent layouts).
    pub fn latent_layer(&self, i: usize) -> Result<&Tensor> {
        match self.layers.get(i) {
            Some(LayerCache::Latent(c)) => Ok(c),
            _ => Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "kv cache layer {i} is not a latent layer ({:?})",
                self.layout
            )))),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_rows_are_far_smaller_than_per_head_kv() {
        // DeepSeek-V2-Lite: 27 layers, 16 heads, q/k head 192 (128 + 64 rope), v head 128,
        // kv_lora_rank 512. Full K/V (v padded to the k width as the per-head kernel needs)
        // against the latent row.
        let full = KvCacheLayout::PerHead { num_layers: 27, num_kv_heads: 16, head_dim: 192 };
        let latent = KvCacheLayout::Latent { num_layers: 27, latent_dim: 576 };
        assert_eq!(latent.bytes_per_token(DType::BF16), 27 * 576 * 2);
        assert!(full.bytes_per_token(DType::F32) >= 10 * latent.bytes_per_token(DType::F32));
        let cache = PagedKvCache::new(latent, 3, 4, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cache.latent_layer(26).unwrap().dims(), &[3, 4, 576]);
        assert!(cache.layer(0).is_err());
        assert_eq!(cache.size_in_bytes(), 27 * 576 * 4 * 12);
    }
}
