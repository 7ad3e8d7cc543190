// Rotary position embedding (rotate-half / NEOX layout, as HF Qwen2 and Llama apply it)
// on q and k, fused with the write of k and v into one layer of the paged KV cache.
// bf16 storage, f32 arithmetic. Two entry points: qilin_rope_store_kv_bf16 rotates q and k
// in place; qilin_rope_qkv_store_kv_bf16 reads them (and v) from the rows of the fused qkv
// projection and writes the rotated q to a buffer of its own, the rotated k to the cache
// only, so a layer needs no copies of the projection's columns. Same arithmetic.
//
// Semantics (the CPU twin is CpuBackend::rope_and_store_kv: backend/cpu/attention.rs
// apply_rope on q and k, then CpuKvCache::store), for each token t < n_tokens, with
// D = head_dim, H = D / 2, pos = positions[t], slot = slot_mapping[t]:
//   for every head of q [t] (num_heads of them) and of k [t] (num_kv_heads), i < H:
//     x1 = f32(x[i]), x2 = f32(x[H + i]), c = cos[pos][i], s = sin[pos][i]
//     x[i]     = bf16_rne(x1 * c - x2 * s)
//     x[H + i] = bf16_rne(x2 * c + x1 * s)
//   each product and the sum/difference rounded to f32 separately (__fmul_rn etc., no
//   FMA contraction), exactly the host's f32 expression: the f32 results equal the
//   twin's bit for bit, so the stored bf16 values are bf16_rne(twin) bit for bit.
//   then key_cache[slot] = rotated k[t], value_cache[slot] = v[t] (rows of
//   num_kv_heads * D values).
//   cos/sin are the f32 tables of model::rope::RopeTable, uploaded unchanged: YaRN's
//   attention factor is already folded into them, so the default, linear, Llama-3 and
//   YaRN ropes all run this one kernel.
//   A position >= table_len or a slot >= num_slots traps (the launcher makes sure the
//   table covers the batch; slots come from the block manager), except that a slot of
//   QILIN_NO_SLOT stores nothing (padding rows of a graph-replayed decode step).
//
// Launch (src/backend/cuda/rope.rs checks all of it):
//   grid  = (n_tokens, 1, 1): one block per token;
//   block = (threads, 1, 1), threads = abi.rs rope_block_threads: the token's work
//           units rounded up to a warp, at most QILIN_ROPE_MAX_THREADS; a unit is one
//           16-byte vector of the first half of a head (8 pairs (i, H + i)) or one
//           16-byte vector of v; threads stride over the units.
//   head_dim % 16 == 0 (so H holds whole vectors; 64 and 128 in our models), every
//   pointer 16-byte aligned (device allocations are). No shared memory.
//   q, k, v, the caches and the tables must not overlap.
//
// Napkin math (Qwen2.5-7B, H100 ~3.35 TB/s): per token q 7 KB read + written, k 1 KB
// read + written + 1 KB to the cache, v 1 KB read + 1 KB to the cache, cos/sin 0.5 KB:
// ~20 KB. Prefill of 2048 tokens: 41 MB -> ~12 us per layer; decode batches are bound
// by the ~3 us launch latency.

#include "common.cuh"

// One token's work, shared by both entry points. IN_PLACE: q and k (q_out, k_out) are
// rotated where they are (q_in, k_in unused). Otherwise the token's q and k heads are
// read at q_in and k_in, the rotated q goes to q_out and the rotated k to the cache only
// (k_out unused). v_row: its v.
template <bool IN_PLACE>
QILIN_DEVICE void rope_store_kv_token(const QilinRopeParams& p,
                                      uint32_t t,
                                      const bf16* q_in,
                                      bf16* q_out,
                                      const bf16* k_in,
                                      bf16* k_out,
                                      const bf16* __restrict__ v_row,
                                      const float* __restrict__ cos_table,
                                      const float* __restrict__ sin_table,
                                      const uint32_t* __restrict__ positions,
                                      const uint32_t* __restrict__ slot_mapping,
                                      bf16* __restrict__ key_cache,
                                      bf16* __restrict__ value_cache) {
    const uint32_t pos = __ldg(positions + t);
    const uint32_t slot = __ldg(slot_mapping + t);
    const bool store = slot != QILIN_NO_SLOT;
    if (pos >= p.table_len || (store && slot >= p.num_slots)) {
        __trap();
    }
    const uint32_t half = p.head_dim / 2;
    const uint32_t vecs_per_head = half / QILIN_VEC_ELEMS;
    const uint32_t kv_width = p.num_kv_heads * p.head_dim;
    const uint32_t rot_units = (p.num_heads + p.num_kv_heads) * vecs_per_head;
    const uint32_t units = rot_units + kv_width / QILIN_VEC_ELEMS;
    // Not dereferenced when !store.
    bf16* k_dst = key_cache + (size_t)(store ? slot : 0) * kv_width;
    bf16* v_dst = value_cache + (size_t)(store ? slot : 0) * kv_width;
    const float* cos_row = cos_table + (size_t)pos * half;
    const float* sin_row = sin_table + (size_t)pos * half;
    for (uint32_t u = threadIdx.x; u < units; u += blockDim.x) {
        if (u >= rot_units) {
            if (!store) {
                continue;
            }
            // v is stored unchanged.
            const size_t at = (size_t)(u - rot_units) * QILIN_VEC_ELEMS;
            store128(v_dst + at, load128_readonly(v_row + at));
            continue;
        }
        // Heads 0 .. num_heads are q's, then num_kv_heads of k's.
        const uint32_t head = u / vecs_per_head;
        const uint32_t j = (u % vecs_per_head) * QILIN_VEC_ELEMS;
        const bool is_k = head >= p.num_heads;
        const bf16* x;
        bf16* y;  // where the rotated head goes (IN_PLACE, or q)
        if constexpr (IN_PLACE) {
            y = is_k ? k_out + (size_t)(head - p.num_heads) * p.head_dim
                     : q_out + (size_t)head * p.head_dim;
            x = y;
        } else {
            const size_t offset = (size_t)(is_k ? head - p.num_heads : head) * p.head_dim;
            x = (is_k ? k_in : q_in) + offset;
            y = q_out + offset;
        }
        float x1[8];
        float x2[8];
        bf16x8_to_float(load128(x + j), x1);
        bf16x8_to_float(load128(x + half + j), x2);
        const float4 c_lo = __ldg(reinterpret_cast<const float4*>(cos_row + j));
        const float4 c_hi = __ldg(reinterpret_cast<const float4*>(cos_row + j + 4));
        const float4 s_lo = __ldg(reinterpret_cast<const float4*>(sin_row + j));
        const float4 s_hi = __ldg(reinterpret_cast<const float4*>(sin_row + j + 4));
        const float c[8] = {c_lo.x, c_lo.y, c_lo.z, c_lo.w, c_hi.x, c_hi.y, c_hi.z, c_hi.w};
        const float s[8] = {s_lo.x, s_lo.y, s_lo.z, s_lo.w, s_hi.x, s_hi.y, s_hi.z, s_hi.w};
        float a[8];
        float b[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            a[i] = __fsub_rn(__fmul_rn(x1[i], c[i]), __fmul_rn(x2[i], s[i]));
            b[i] = __fadd_rn(__fmul_rn(x2[i], c[i]), __fmul_rn(x1[i], s[i]));
        }
        const uint4 first = float_to_bf16x8(a);
        const uint4 second = float_to_bf16x8(b);
        if (IN_PLACE || !is_k) {
            store128(y + j, first);
            store128(y + half + j, second);
        }
        if (is_k && store) {
            bf16* dst = k_dst + (size_t)(head - p.num_heads) * p.head_dim;
            store128(dst + j, first);
            store128(dst + half + j, second);
        }
    }
}

// Traps unless head_dim holds whole vectors per half and every pointer is 16-byte aligned.
QILIN_DEVICE void rope_check(const QilinRopeParams& p, uintptr_t any_addr) {
    if (p.head_dim == 0 || p.head_dim % (2 * QILIN_VEC_ELEMS) != 0 || (any_addr & 15u) != 0) {
        __trap();
    }
}

// q:            bf16 [n_tokens, num_heads * head_dim]     rotated in place
// k:            bf16 [n_tokens, num_kv_heads * head_dim]  rotated in place
// v:            bf16 [n_tokens, num_kv_heads * head_dim]  only read
// cos_table:    f32  [table_len, head_dim / 2]            RopeTable::cos, row = position
// sin_table:    f32  [table_len, head_dim / 2]            RopeTable::sin, row = position
// positions:    u32  [n_tokens]                           each < table_len
// slot_mapping: u32  [n_tokens]                           each < num_slots and distinct, or QILIN_NO_SLOT
// key_cache:    bf16 [num_slots, num_kv_heads * head_dim] one layer; rows slot_mapping written
// value_cache:  bf16 [num_slots, num_kv_heads * head_dim] one layer; rows slot_mapping written
extern "C" __global__ void __launch_bounds__(QILIN_ROPE_MAX_THREADS)
qilin_rope_store_kv_bf16(const QilinRopeParams p,
                         bf16* __restrict__ q,
                         bf16* __restrict__ k,
                         const bf16* __restrict__ v,
                         const float* __restrict__ cos_table,
                         const float* __restrict__ sin_table,
                         const uint32_t* __restrict__ positions,
                         const uint32_t* __restrict__ slot_mapping,
                         bf16* __restrict__ key_cache,
                         bf16* __restrict__ value_cache) {
    QILIN_PDL_ENTRY();
    rope_check(p, reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) |
                      reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(cos_table) |
                      reinterpret_cast<uintptr_t>(sin_table) |
                      reinterpret_cast<uintptr_t>(key_cache) |
                      reinterpret_cast<uintptr_t>(value_cache));
    const uint32_t t = blockIdx.x;
    if (t >= p.n_tokens) {
        return;
    }
    const uint32_t kv_width = p.num_kv_heads * p.head_dim;
    bf16* q_row = q + (size_t)t * p.num_heads * p.head_dim;
    bf16* k_row = k + (size_t)t * kv_width;
    rope_store_kv_token<true>(p, t, nullptr, q_row, nullptr, k_row, v + (size_t)t * kv_width,
                              cos_table, sin_table, positions, slot_mapping, key_cache,
                              value_cache);
}

// As qilin_rope_store_kv_bf16, reading q, k and v from the fused projection's rows (the
// q, k, v columns of qkv, so no split copies run) and writing the rotated q to q_out;
// the rotated k goes to the cache only. Compiles, unverified on hardware (opt-in:
// QILIN_CUDA_ROPE_QKV=1).
// q_out:        bf16 [n_tokens, num_heads * head_dim]     the rotated q
// qkv:          bf16 [n_tokens, (num_heads + 2 * num_kv_heads) * head_dim]  only read
// (the rest as for qilin_rope_store_kv_bf16)
extern "C" __global__ void __launch_bounds__(QILIN_ROPE_MAX_THREADS)
qilin_rope_qkv_store_kv_bf16(const QilinRopeParams p,
                             bf16* __restrict__ q_out,
                             const bf16* __restrict__ qkv,
                             const float* __restrict__ cos_table,
                             const float* __restrict__ sin_table,
                             const uint32_t* __restrict__ positions,
                             const uint32_t* __restrict__ slot_mapping,
                             bf16* __restrict__ key_cache,
                             bf16* __restrict__ value_cache) {
    QILIN_PDL_ENTRY();
    rope_check(p, reinterpret_cast<uintptr_t>(q_out) | reinterpret_cast<uintptr_t>(qkv) |
                      reinterpret_cast<uintptr_t>(cos_table) |
                      reinterpret_cast<uintptr_t>(sin_table) |
                      reinterpret_cast<uintptr_t>(key_cache) |
                      reinterpret_cast<uintptr_t>(value_cache));
    const uint32_t t = blockIdx.x;
    if (t >= p.n_tokens) {
        return;
    }
    const uint32_t q_width = p.num_heads * p.head_dim;
    const uint32_t kv_width = p.num_kv_heads * p.head_dim;
    const bf16* row = qkv + (size_t)t * (q_width + 2 * kv_width);  // 16-byte aligned: head_dim % 16 == 0
    rope_store_kv_token<false>(p, t, row, q_out + (size_t)t * q_width, row + q_width, nullptr,
                               row + q_width + kv_width, cos_table, sin_table, positions,
                               slot_mapping, key_cache, value_cache);
}
