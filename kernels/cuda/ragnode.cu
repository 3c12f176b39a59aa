// ragnode's CUDA kernels, compiled to PTX at build time (kernels/build.rs, feature `cuda`)
// and launched through cudarc from kernels/src/cuda.rs. Each one has a CPU twin in the
// crate (the kernel the CPU path runs, or a reference written for the comparison) and the
// same layouts:
//   key cache   [blocks, kv_heads, head_dim, block_size]   (keys transposed per block)
//   value cache [blocks, kv_heads, block_size, head_dim]
//   latent cache [blocks, block_size, latent_dim]          (MLA: one row per token)
// Activations are f32; caches f32, f16 or bf16. Accumulation is always f32.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* scratch) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// End of a split online softmax: each warp holds its running max `m`, denominator `l`
// and numerators `acc` (lane owns elements lane + 32 i of `width`); the block merges them
// through shared memory (`wm`, `wl`: [WARPS], `wacc`: [WARPS][width]) into `out[width]`.
template <int WARPS, int PER_LANE>
__device__ void merge_warps(float m, float l, const float (&acc)[PER_LANE], float* wm, float* wl, float* wacc,
                            uint32_t width, float* __restrict__ out) {
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const uint32_t d = lane + 32 * i;
        if (d < width) wacc[warp * width + d] = acc[i];
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, wm[w]);
    float denom = 0.f;
    for (int w = 0; w < WARPS; ++w)
        if (wm[w] != -INFINITY) denom += wl[w] * expf(wm[w] - mx);
    for (uint32_t d = threadIdx.x; d < width; d += blockDim.x) {
        float num = 0.f;
        for (int w = 0; w < WARPS; ++w)
            if (wm[w] != -INFINITY) num += wacc[w * width + d] * expf(wm[w] - mx);
        out[d] = num / denom;
    }
}

// ---------------------------------------------------------------------------------------
// Paged attention (decode rows and prefill chunks alike): one CTA per (query row, head),
// PA_WARPS warps each running an online softmax over their share of the key tiles, merged
// at the end. A tile is up to 32 keys of one block; when a block holds fewer than 32 keys,
// 32 / block_size lanes split each key's dot product, so every load of a key row is
// coalesced (keys are stored transposed, one head_dim row of block_size keys).
// Query row `row` belongs to sequence row_seq[row] and sits at position row_pos[row]: it
// attends keys 0..=row_pos[row] through that sequence's block table.
// Limits (checked on the host): head_dim <= 32 * PA_MAX_DPL, block_size a power of two.
#define PA_WARPS 4
#define PA_MAX_DPL 8

template <typename T>
__device__ void paged_attention(float* __restrict__ out, const float* __restrict__ q, const T* __restrict__ kc,
                                const T* __restrict__ vc, const uint32_t* __restrict__ row_seq,
                                const uint32_t* __restrict__ row_pos, const uint32_t* __restrict__ tables,
                                uint32_t max_blocks, uint32_t heads, uint32_t kv_heads, uint32_t hd, uint32_t bs,
                                float scale) {
    extern __shared__ float smem[];
    const uint32_t row = blockIdx.x, h = blockIdx.y;
    const uint32_t kvh = h / (heads / kv_heads);
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t ctx = row_pos[row] + 1;
    const uint32_t* table = tables + (size_t)row_seq[row] * max_blocks;

    float* sq = smem;                   // [hd] scaled query
    float* wm = sq + hd;                // [PA_WARPS] running max per warp
    float* wl = wm + PA_WARPS;          // [PA_WARPS] running denominator per warp
    float* wacc = wl + PA_WARPS;        // [PA_WARPS][hd] running numerators
    for (uint32_t d = threadIdx.x; d < hd; d += blockDim.x) sq[d] = q[((size_t)row * heads + h) * hd + d] * scale;
    __syncthreads();

    float acc[PA_MAX_DPL];
#pragma unroll
    for (int i = 0; i < PA_MAX_DPL; ++i) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;

    const uint32_t tile = bs < 32 ? bs : 32;  // keys per tile
    const uint32_t lanes_per_key = 32 / tile;
    const uint32_t key = lane % tile, part = lane / tile;
    const uint32_t tiles_per_block = bs / tile;
    const uint32_t ntiles = ((ctx + bs - 1) / bs) * tiles_per_block;
    const size_t head_stride = (size_t)hd * bs;

    for (uint32_t t = warp; t < ntiles; t += PA_WARPS) {
        const uint32_t kb = t / tiles_per_block, first = (t % tiles_per_block) * tile;
        const size_t blk = table[kb];
        const uint32_t pos = kb * bs + first + key;
        const T* kp = kc + (blk * kv_heads + kvh) * head_stride + first + key;
        float s = 0.f;
        for (uint32_t d = part; d < hd; d += lanes_per_key) s += sq[d] * to_f32(kp[(size_t)d * bs]);
        for (uint32_t o = tile; o < 32; o <<= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
        const bool valid = pos < ctx;
        s = valid ? s : -INFINITY;
        const float tile_max = warp_max(s);
        if (tile_max == -INFINITY) continue;  // a tile past the context (uniform per warp)
        const float m_new = fmaxf(m, tile_max);
        const float corr = expf(m - m_new);
        const float p = valid ? expf(s - m_new) : 0.f;
        l = l * corr + warp_sum(part == 0 ? p : 0.f);
#pragma unroll
        for (int i = 0; i < PA_MAX_DPL; ++i) acc[i] *= corr;
        const T* vp = vc + (blk * kv_heads + kvh) * head_stride + (size_t)first * hd;
        for (uint32_t k = 0; k < tile; ++k) {
            const float pk = __shfl_sync(FULL_MASK, p, k);
            if (pk == 0.f) continue;
            const T* vrow = vp + (size_t)k * hd;
#pragma unroll
            for (int i = 0; i < PA_MAX_DPL; ++i) {
                const uint32_t d = lane + 32 * i;
                if (d < hd) acc[i] += pk * to_f32(vrow[d]);
            }
        }
        m = m_new;
    }

    merge_warps<PA_WARPS, PA_MAX_DPL>(m, l, acc, wm, wl, wacc, hd, out + ((size_t)row * heads + h) * hd);
}

#define PAGED_ATTENTION(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(PA_WARPS * 32)                                           \
        NAME(float* out, const float* q, const T* kc, const T* vc, const uint32_t* row_seq,             \
             const uint32_t* row_pos, const uint32_t* tables, uint32_t max_blocks, uint32_t heads,         \
             uint32_t kv_heads, uint32_t hd, uint32_t bs, float scale) {                                 \
        paged_attention<T>(out, q, kc, vc, row_seq, row_pos, tables, max_blocks, heads, kv_heads, hd, bs, \
                           scale);                                                                         \
    }
PAGED_ATTENTION(paged_attention_f32, float)
PAGED_ATTENTION(paged_attention_f16, __half)
PAGED_ATTENTION(paged_attention_bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------
// MLA latent attention: one CTA per (query row, head); each warp takes whole cached rows
// (latent_dim contiguous numbers: coalesced), the score is the full-row dot with the
// absorbed query, the value the row's first value_dim numbers. Online softmax per warp,
// merged across warps as above. Limit: value_dim <= 32 * ML_MAX_VPL.
#define ML_WARPS 4
#define ML_MAX_VPL 16

template <typename T>
__device__ void latent_attention(float* __restrict__ out, const float* __restrict__ q, const T* __restrict__ cache,
                                 const uint32_t* __restrict__ row_seq, const uint32_t* __restrict__ row_pos,
                                 const uint32_t* __restrict__ tables, uint32_t max_blocks, uint32_t heads,
                                 uint32_t ld, uint32_t vd, uint32_t bs, float scale) {
    extern __shared__ float smem[];
    const uint32_t row = blockIdx.x, h = blockIdx.y;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t ctx = row_pos[row] + 1;
    const uint32_t* table = tables + (size_t)row_seq[row] * max_blocks;
    float* sq = smem;             // [ld]
    float* wm = sq + ld;          // [ML_WARPS]
    float* wl = wm + ML_WARPS;    // [ML_WARPS]
    float* wacc = wl + ML_WARPS;  // [ML_WARPS][vd]
    for (uint32_t d = threadIdx.x; d < ld; d += blockDim.x) sq[d] = q[((size_t)row * heads + h) * ld + d] * scale;
    __syncthreads();

    float acc[ML_MAX_VPL];
#pragma unroll
    for (int i = 0; i < ML_MAX_VPL; ++i) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (uint32_t j = warp; j < ctx; j += ML_WARPS) {
        const size_t slot = (size_t)table[j / bs] * bs + j % bs;
        const T* r = cache + slot * ld;
        float s = 0.f;
        for (uint32_t d = lane; d < ld; d += 32) s += sq[d] * to_f32(r[d]);
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < ML_MAX_VPL; ++i) {
            const uint32_t d = lane + 32 * i;
            acc[i] = acc[i] * corr + (d < vd ? p * to_f32(r[d]) : 0.f);
        }
        m = m_new;
    }
    merge_warps<ML_WARPS, ML_MAX_VPL>(m, l, acc, wm, wl, wacc, vd, out + ((size_t)row * heads + h) * vd);
}

#define LATENT_ATTENTION(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(ML_WARPS * 32)                                          \
        NAME(float* out, const float* q, const T* cache, const uint32_t* row_seq, const uint32_t* row_pos, \
             const uint32_t* tables, uint32_t max_blocks, uint32_t heads, uint32_t ld, uint32_t vd,        \
             uint32_t bs, float scale) {                                                                 \
        latent_attention<T>(out, q, cache, row_seq, row_pos, tables, max_blocks, heads, ld, vd, bs, scale); \
    }
LATENT_ATTENTION(latent_attention_f32, float)
LATENT_ATTENTION(latent_attention_f16, __half)
LATENT_ATTENTION(latent_attention_bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------
// KV-cache scatter: the step's new keys or values (f32 [T, kv_heads, head_dim]) into
// their slots (u32 [T]) of one cache (`keys`: the transposed key layout); one thread per
// element. Slots past the cache are skipped (the host checks block tables beforehand).
template <typename T>
__device__ void write_cache(T* __restrict__ cache, const float* __restrict__ src, const uint32_t* __restrict__ slots,
                            uint32_t t, uint32_t kv_heads, uint32_t hd, uint32_t bs, uint32_t num_blocks,
                            uint32_t keys) {
    const size_t n = (size_t)t * kv_heads * hd;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t d = i % hd, hh = (i / hd) % kv_heads;
        const size_t r = i / ((size_t)hd * kv_heads);
        const uint32_t slot = slots[r];
        const uint32_t b = slot / bs, o = slot % bs;
        if (b >= num_blocks) continue;
        const size_t base = (size_t)b * kv_heads + hh;
        const size_t at = keys ? (base * hd + d) * bs + o : (base * bs + o) * hd + d;
        cache[at] = from_f32<T>(src[i]);
    }
}

#define WRITE_CACHE(NAME, T)                                                                                 \
    extern "C" __global__ void NAME(T* cache, const float* src, const uint32_t* slots, uint32_t t,           \
                                    uint32_t kv_heads, uint32_t hd, uint32_t bs, uint32_t num_blocks,        \
                                    uint32_t keys) {                                                        \
        write_cache<T>(cache, src, slots, t, kv_heads, hd, bs, num_blocks, keys);                           \
    }
WRITE_CACHE(write_cache_f32, float)
WRITE_CACHE(write_cache_f16, __half)
WRITE_CACHE(write_cache_bf16, __nv_bfloat16)

// Latent rows (f32 [T, latent_dim]) into the latent cache at `slots`.
template <typename T>
__device__ void write_latent(T* __restrict__ cache, const float* __restrict__ rows, const uint32_t* __restrict__ slots,
                             uint32_t t, uint32_t ld, uint32_t total_slots) {
    const size_t n = (size_t)t * ld;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t slot = slots[i / ld];
        if (slot >= total_slots) continue;
        cache[(size_t)slot * ld + i % ld] = from_f32<T>(rows[i]);
    }
}

#define WRITE_LATENT(NAME, T)                                                                               \
    extern "C" __global__ void NAME(T* cache, const float* rows, const uint32_t* slots, uint32_t t, uint32_t ld, \
                                    uint32_t total_slots) {                                                 \
        write_latent<T>(cache, rows, slots, t, ld, total_slots);                                            \
    }
WRITE_LATENT(write_latent_f32, float)
WRITE_LATENT(write_latent_f16, __half)
WRITE_LATENT(write_latent_bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------
// Fused residual add + RMS norm over rows of width d: sum = x + residual,
// normed = sum / sqrt(mean(sum^2) + eps) * weight. One CTA per row. `out` is planar:
// out[0 .. T*d) = sum, out[T*d .. 2*T*d) = normed.
extern "C" __global__ void add_rms_norm_f32(float* __restrict__ out, const float* __restrict__ x,
                                            const float* __restrict__ residual, const float* __restrict__ w,
                                            uint32_t t, uint32_t d, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float* xr = x + row * d;
    const float* rr = residual + row * d;
    float* sr = out + row * d;
    float* nr = out + (size_t)t * d + row * d;
    float ss = 0.f;
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float s = xr[i] + rr[i];
        sr[i] = s;
        ss += s * s;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (uint32_t i = threadIdx.x; i < d; i += blockDim.x) nr[i] = sr[i] * inv * w[i];
}

// ---------------------------------------------------------------------------------------
// Rotary embedding (half-split), in place on x: [T, n, stride] rotating the first
// 2 * half numbers of each of the n vectors of a row with that row's cos/sin [T, half].
// One thread per (row, vector, pair).
extern "C" __global__ void rope_inplace_f32(float* __restrict__ x, const float* __restrict__ cos_t,
                                            const float* __restrict__ sin_t, uint32_t t, uint32_t n,
                                            uint32_t stride, uint32_t half) {
    const size_t total = (size_t)t * n * half;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t p = i % half;
        const size_t vec = i / half;
        const size_t r = vec / n;
        float* xv = x + vec * stride;
        const float c = cos_t[r * half + p], s = sin_t[r * half + p];
        const float x1 = xv[p], x2 = xv[p + half];
        xv[p] = x1 * c - x2 * s;
        xv[p + half] = x1 * s + x2 * c;
    }
}

// Split of a fused projection qkv [T, (nh + 2 nkv) hd] into planar [q | k | v] with q and k
// rotated (the CPU kernel `rowwise::rope_split_qkv` does the same). One thread per
// (row, head of q|k|v, pair).
extern "C" __global__ void rope_split_qkv_f32(float* __restrict__ out, const float* __restrict__ qkv,
                                              const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                              uint32_t t, uint32_t nh, uint32_t nkv, uint32_t hd) {
    const uint32_t half = hd / 2, heads = nh + 2 * nkv;
    const size_t total = (size_t)t * heads * half;
    const size_t q_end = (size_t)t * nh * hd, k_end = (size_t)t * (nh + nkv) * hd;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t p = i % half, h = (i / half) % heads;
        const size_t r = i / ((size_t)half * heads);
        const float* src = qkv + (r * heads + h) * hd;
        float* dst;
        if (h < nh) dst = out + (r * nh + h) * hd;
        else if (h < nh + nkv) dst = out + q_end + (r * nkv + (h - nh)) * hd;
        else {
            dst = out + k_end + (r * nkv + (h - nh - nkv)) * hd;
            dst[p] = src[p];
            dst[p + half] = src[p + half];
            continue;
        }
        const float c = cos_t[r * half + p], s = sin_t[r * half + p];
        const float x1 = src[p], x2 = src[p + half];
        dst[p] = x1 * c - x2 * s;
        dst[p + half] = x1 * s + x2 * c;
    }
}

// ---------------------------------------------------------------------------------------
// On-device sampling: one CTA per row of logits [R, V]; only the chosen ids (u32 [R]) go
// back to the host. The rule, shared with the CPU reference `sampling::sample_rows_reference`:
//   temperature <= 1e-5: argmax (lowest id on ties);
//   else weights w = exp((logit - max) / temperature) (the top weight is 1), a token is kept
//   when w >= tau = max(k-th largest w [top_k > 0], min_p, tau_p), where tau_p is the largest
//   weight whose "w >= tau_p" set still holds top_p of the mass left by the first two rules;
//   the token is the first id (in id order) whose running kept mass exceeds u * kept mass.
// Thresholds are found by bisection on the float bits of the weights (positive floats
// order like their bits), so they are exact weight values. `scratch` holds R * V floats.
#define SAMPLE_THREADS 1024

__device__ float kept_mass(const float* w, uint32_t vocab, float tau, float* scratch) {
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) s += w[i] >= tau ? w[i] : 0.f;
    return block_sum(s, scratch);
}

__device__ float kept_count(const float* w, uint32_t vocab, float tau, float* scratch) {
    float c = 0.f;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) c += w[i] >= tau ? 1.f : 0.f;
    return block_sum(c, scratch);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows_f32(uint32_t* __restrict__ ids, const float* __restrict__ logits, float* __restrict__ weights,
                    const float* __restrict__ temperature, const uint32_t* __restrict__ top_k,
                    const float* __restrict__ top_p, const float* __restrict__ min_p, const float* __restrict__ u,
                    uint32_t vocab) {
    __shared__ float scratch[32];
    __shared__ float chunk_mass[SAMPLE_THREADS];
    __shared__ uint32_t arg_idx[32];
    const uint32_t r = blockIdx.x;
    const float* lr = logits + (size_t)r * vocab;
    float* w = weights + (size_t)r * vocab;

    // Max and argmax (lowest id on ties).
    float best = -INFINITY;
    uint32_t best_i = 0xffffffffu;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = lr[i];
        if (v > best || (v == best && i < best_i)) best = v, best_i = i;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, best, o);
        const uint32_t oi = __shfl_xor_sync(FULL_MASK, best_i, o);
        if (ov > best || (ov == best && oi < best_i)) best = ov, best_i = oi;
    }
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if (lane == 0) scratch[warp] = best, arg_idx[warp] = best_i;
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? scratch[lane] : -INFINITY;
        best_i = lane < warps ? arg_idx[lane] : 0xffffffffu;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, best, o);
            const uint32_t oi = __shfl_xor_sync(FULL_MASK, best_i, o);
            if (ov > best || (ov == best && oi < best_i)) best = ov, best_i = oi;
        }
        if (lane == 0) scratch[0] = best, arg_idx[0] = best_i;
    }
    __syncthreads();
    const float max_logit = scratch[0];
    const uint32_t argmax = arg_idx[0];
    const float temp = temperature[r];
    if (temp <= 1e-5f) {
        if (threadIdx.x == 0) ids[r] = argmax;
        return;
    }
    const float inv_t = 1.f / temp;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) w[i] = expf((lr[i] - max_logit) * inv_t);
    __syncthreads();

    float tau = 0.f;
    const uint32_t k = top_k[r];
    if (k > 0 && k < vocab) {
        // Largest t with count(w >= t) >= k: the k-th largest weight.
        uint32_t lo = 0, hi = __float_as_uint(1.f) + 1;
        while (hi - lo > 1) {
            const uint32_t mid = lo + (hi - lo) / 2;
            if (kept_count(w, vocab, __uint_as_float(mid), scratch) >= (float)k) lo = mid;
            else hi = mid;
        }
        tau = __uint_as_float(lo);
    }
    tau = fmaxf(tau, min_p[r]);
    const float tp = top_p[r];
    if (tp < 1.f) {
        const float target = tp * kept_mass(w, vocab, tau, scratch);
        uint32_t lo = __float_as_uint(tau), hi = __float_as_uint(1.f) + 1;
        while (hi - lo > 1) {
            const uint32_t mid = lo + (hi - lo) / 2;
            if (kept_mass(w, vocab, __uint_as_float(mid), scratch) >= target) lo = mid;
            else hi = mid;
        }
        tau = __uint_as_float(lo);
    }

    // Inverse CDF in id order over contiguous chunks: chunk masses, an exclusive scan, and
    // the one chunk holding the target walks its ids.
    const uint32_t chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const uint32_t begin = min(vocab, threadIdx.x * chunk), end = min(vocab, begin + chunk);
    float mine = 0.f;
    uint32_t last_kept = 0;
    for (uint32_t i = begin; i < end; ++i)
        if (w[i] >= tau && w[i] > 0.f) mine += w[i], last_kept = i;
    chunk_mass[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float run = 0.f;
        for (uint32_t i = 0; i < blockDim.x; ++i) {
            const float c = chunk_mass[i];
            chunk_mass[i] = run;
            run += c;
        }
        scratch[0] = run;
    }
    __syncthreads();
    const float total = scratch[0];
    const float target = u[r] * total;
    const float start = chunk_mass[threadIdx.x];
    // The last kept id stands in if rounding leaves the target past the end.
    const float last_any = block_max(mine > 0.f ? (float)last_kept : 0.f, scratch);
    if (threadIdx.x == 0) ids[r] = (uint32_t)last_any;
    __syncthreads();
    // Chunks are half-open, consecutive intervals of the running mass: one holds the target.
    if (mine > 0.f && start <= target && target < start + mine) {
        float run = start;
        uint32_t pick = last_kept;
        for (uint32_t i = begin; i < end; ++i) {
            if (w[i] < tau) continue;
            run += w[i];
            if (run > target) {
                pick = i;
                break;
            }
        }
        ids[r] = pick;
    }
}
