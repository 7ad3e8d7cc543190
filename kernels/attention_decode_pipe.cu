// Paged causal attention for decode rows, pipelined, with the split merge folded into the
// same launch: qilin_attention_decode_pipe_hd{64,128}_bf16 (the default for D = 64 and
// 128 since the H200 run at 1bf3ca5; QILIN_ATTN_DECODE_PIPE=0 takes the mma kernel
// instead). The per-step arithmetic and the warps' merge are attention_decode_tile.cuh's,
// as the mma kernel's. Same semantics as the kernels of
// attention_decode.cu (see the formula there); CPU twin
// backend::cpu::attention::paged_attention (attend_direct).
//
// Why a second tensor-core decode kernel. On an H200 the mma kernel of attention_decode.cu
// reached 11% of copy bandwidth for 1 sequence x 8K and 38% for 8 (78% at 64), and its
// split sweep showed that a warp's 16-key step, not the number of blocks, sets the pace:
// ~3-4 us per step (32 blocks of 1024-key splits: 16 steps in ~55 us; 128 blocks of 256:
// 4 steps in ~17 us after the fixed costs). Each step is a chain of dependent waits: the
// block-table entry (one load per copy, via attention_cache_slot), then the K copy (a
// full DRAM round trip with nothing else of the warp in flight), then S, then V; the next
// step's loads start only after that. Before the first step come three more round trips
// (seq_starts -> context_lens -> the table), and after the last the partials go through
// a second launch (qilin_attention_decode_reduce_bf16) whose single thread per dim walks
// the splits one dependent L2 load at a time. At batch 1 the kernel moves 16 MiB, 4 us
// at full bandwidth: a dozen serial round trips (~0.7-1 us each) are the bulk of it.
//
// What this kernel changes (one block = one sequence x one KV head (x chunk) x one split,
// 4 warps, warp w takes the split's 16-key cache blocks w, w + 4, ...; as the mma kernel):
//   - each warp keeps QILIN_ATTN_DECODE_PIPE_STAGES blocks' K and V in flight: a ring
//     of shared buffers filled with cp.async, step i + STAGES - 1 issued before step i is
//     computed (one commit group per step);
//   - the block-table entries of a warp's next 32 steps are one coalesced load (lane l
//     holds step l's), taken by a shuffle; the next 32 are loaded while these are used;
//   - the loads that depend only on the block's coordinates (seq_starts, context_lens,
//     the table) are issued together, so the first K/V copy waits for one round trip;
//   - the per-copy addresses are one base per step plus a constant stride per chunk;
//   - splits merge in the same launch: every split block writes its partial (m, l, O),
//     then counts itself done on a per-(sequence, KV head, chunk) counter; the block
//     that finishes last merges all the splits and writes out, then resets the counter
//     to 0, so the counters (zeroed once by the device) are ready for the next layer and
//     for every replay of a CUDA graph without a memset. A sequence whose context fits
//     one split writes out directly and never touches its counter.
//
// Napkin math (H200: copy bandwidth 4.26 TB/s, 132 SMs; Qwen2.5-7B: 4 KV heads, D = 128,
// group 7; 1 sequence x 8K context = 16 MiB of K/V):
//   - in flight: bandwidth x loaded latency ~ 4.26 TB/s x ~1.2 us ~ 5 MB. One block per
//     SM with 4 warps x 3 stages x 8 KiB = 96 KiB each is 12.7 MB: the whole 16 MiB is
//     requested within the first ~3 round trips, so the body costs ~1 round trip + 16 MiB
//     / 4.26 TB/s ~ 1 + 3.9 us.
//   - issue per step and warp: 16 cp.async with ~2 instructions of address each, 16
//     ldmatrix.x4, 32 mma, ~70 softmax instructions, 64 FMUL of O rescaling: ~250
//     instructions for 8 KiB, against ~560 SM clocks per 8 KiB at an SM's 1/132 of the
//     bandwidth with 4 warps (one per sub-partition) per block: memory-bound, 2x margin.
//   - the merge: 32 splits x 7 heads x (128 + 2) x 4 B = 116 KB per KV head read from L2
//     by one block: ~1 us at ~64 B/clock for one SM, plus the counter's round trip.
//     Cheaper than the reduction launch it replaces (~3-5 us at batch 1) but not free,
//     which is why the plan aims at one block per SM rather than more, smaller splits.
//
// Launch contract (the Rust launcher checks it; violations trap):
//   head_dim == D, 1 <= group_chunk <= QILIN_ATTN_DECODE_MMA_MAX_GROUP, num_heads %
//   num_kv_heads == 0, blockDim.x == QILIN_ATTN_DECODE_PIPE_THREADS, split_tokens a
//   positive multiple of 16, n_splits * split_tokens >= every decode row's context,
//   dynamic shared memory = QILIN_ATTN_DECODE_PIPE_HD{128,64}_SMEM_BYTES; when n_splits >
//   1: counters non-null with n_seqs * gridDim.y <= QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS
//   entries, all 0 at launch (the kernel leaves them 0), and part_out / part_ml sized as
//   for the mma kernel; q, k_cache, v_cache, out 16-byte aligned.

#include "attention_common.cuh"
#include "attention_decode_tile.cuh"
#include "mma.cuh"

static constexpr int PIPE_THREADS = QILIN_ATTN_DECODE_PIPE_THREADS;
static constexpr int PIPE_WARPS = PIPE_THREADS / QILIN_WARP_SIZE;
static constexpr int PIPE_STAGES = QILIN_ATTN_DECODE_PIPE_STAGES;
static constexpr int PIPE_KEYS = QILIN_BLOCK_SIZE;  // keys per warp step: one cache block
static constexpr int PIPE_PAD = 8;                  // bf16 per shared row beyond D
static constexpr unsigned FULL_MASK = 0xffffffffu;
static_assert(PIPE_KEYS == 16, "one m16n8k16 k-step of P V per cache block");
static_assert(PIPE_STAGES >= 2, "a ring of one buffer would not overlap anything");
static_assert(QILIN_ATTN_DECODE_MMA_MAX_GROUP == 16, "the 16 rows of an mma tile");

template <int D>
struct PipeLayout {
    static constexpr int LD = D + PIPE_PAD;             // shared row stride, bf16
    static constexpr int STAGE_ELEMS = 2 * PIPE_KEYS * LD;  // K rows, then V rows
    static constexpr int RING_BYTES = PIPE_WARPS * PIPE_STAGES * STAGE_ELEMS * 2;
    static constexpr int MERGE_BYTES = PIPE_WARPS * 16 * D * 4;  // O of every warp, f32
    static constexpr int SMEM_BYTES = RING_BYTES > MERGE_BYTES ? RING_BYTES : MERGE_BYTES;
};
static_assert(PipeLayout<128>::SMEM_BYTES == QILIN_ATTN_DECODE_PIPE_HD128_SMEM_BYTES,
              "abi.h's shared-memory size for head_dim 128");
static_assert(PipeLayout<64>::SMEM_BYTES == QILIN_ATTN_DECODE_PIPE_HD64_SMEM_BYTES,
              "abi.h's shared-memory size for head_dim 64");

// A read-only 32-bit load that the compiler may not sink below the early exits after it
// (a volatile asm statement keeps its place), so the block's first loads, whose results
// those exits need, share one memory round trip instead of queueing behind each other.
QILIN_DEVICE uint32_t load_u32_early(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.volatile.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
}

// Block-table entry of a warp's `i`-th step: lane l of `window` holds step (i & ~31) + l's.
QILIN_DEVICE uint32_t pipe_table_entry(uint32_t window, unsigned i) {
    return __shfl_sync(FULL_MASK, window, i % QILIN_WARP_SIZE);
}

// Loads the table entries of a warp's steps 32 * w .. 32 * w + 31 (lane l: step 32 w + l,
// logical block first_block + warp + (32 w + l) * PIPE_WARPS); 0 past the table (such
// steps are never issued: the issue traps on them first). Past the table it reads entry 0
// of the whole table instead (the batch's table buffer is never empty) and drops it, so
// the load is unconditional and keeps its early place.
QILIN_DEVICE uint32_t pipe_table_window(const uint32_t* __restrict__ block_tables,
                                        const uint32_t* __restrict__ table, unsigned first_block,
                                        unsigned warp, unsigned lane, unsigned w,
                                        unsigned max_blocks) {
    const unsigned logical = first_block + warp + (w * QILIN_WARP_SIZE + lane) * PIPE_WARPS;
    const bool inside = logical < max_blocks;
    const uint32_t v = load_u32_early(inside ? table + logical : block_tables);
    return inside ? v : 0u;
}

template <int D>
QILIN_DEVICE void attention_decode_pipe(const QilinAttentionParams& p,
                                        bf16* __restrict__ out,
                                        float* __restrict__ part_out,
                                        float* __restrict__ part_ml,
                                        unsigned* __restrict__ counters,
                                        const bf16* __restrict__ q,
                                        const bf16* __restrict__ k_cache,
                                        const bf16* __restrict__ v_cache,
                                        const uint32_t* __restrict__ seq_starts,
                                        const uint32_t* __restrict__ context_lens,
                                        const uint32_t* __restrict__ block_tables) {
    static_assert(D % 32 == 0 && D <= 128, "pairs of 16-dim k-steps; O fits registers");
    using L = PipeLayout<D>;
    constexpr int LD = L::LD;
    constexpr int VECS = D / QILIN_VEC_ELEMS;             // 16-byte chunks per K/V row
    constexpr int KEYS_PER_PASS = QILIN_WARP_SIZE / VECS;  // rows one warp-wide copy covers
    constexpr int CHUNKS = PIPE_KEYS / KEYS_PER_PASS;      // copies per lane per matrix
    static_assert(QILIN_WARP_SIZE % VECS == 0 && PIPE_KEYS % KEYS_PER_PASS == 0, "tiling");
    extern __shared__ __align__(128) unsigned char s_raw[];
    __shared__ float s_m[PIPE_WARPS][16];
    __shared__ float s_l[PIPE_WARPS][16];
    __shared__ float s_head_m[16];  // the merging block's per-head max and sum over splits
    __shared__ float s_head_l[16];
    __shared__ unsigned s_last;

    if (blockDim.x != PIPE_THREADS || p.head_dim != D || p.group_chunk == 0 ||
        p.group_chunk > QILIN_ATTN_DECODE_MMA_MAX_GROUP || p.num_kv_heads == 0 ||
        p.num_heads % p.num_kv_heads != 0 || p.split_tokens == 0 ||
        p.split_tokens % QILIN_BLOCK_SIZE != 0) {
        __trap();
    }
    const unsigned s = blockIdx.x;
    if (s >= p.n_seqs) {
        return;
    }
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    // Everything below up to the first use of row / ctx depends only on blockIdx: the
    // sequence's bounds, its context and the first table window are loaded together.
    const unsigned k_begin = blockIdx.z * p.split_tokens;
    const unsigned first_block = k_begin / QILIN_BLOCK_SIZE;
    const uint32_t* table = block_tables + (size_t)s * p.max_blocks_per_seq;
    const unsigned row = load_u32_early(seq_starts + s);
    const unsigned row_end = load_u32_early(seq_starts + s + 1);
    const unsigned ctx = load_u32_early(context_lens + s);
    uint32_t window =
        pipe_table_window(block_tables, table, first_block, warp, lane, 0, p.max_blocks_per_seq);
    if (row_end - row != 1) {
        return;  // not a decode row: the prefill kernel owns it
    }
    if ((size_t)p.n_splits * p.split_tokens < ctx) {
        __trap();  // the grid's splits would leave keys of this context unread
    }
    if (k_begin >= ctx) {
        return;  // this sequence has fewer splits than the grid
    }
    const unsigned k_end = min(k_begin + p.split_tokens, ctx);
    const unsigned n_valid = ceil_div(ctx, p.split_tokens);  // splits holding keys

    const unsigned group = p.num_heads / p.num_kv_heads;
    const unsigned chunks = ceil_div(group, p.group_chunk);
    const unsigned kv_head = blockIdx.y / chunks;
    const unsigned chunk = blockIdx.y % chunks;
    if (kv_head >= p.num_kv_heads) {
        return;
    }
    const unsigned head0 = kv_head * group + chunk * p.group_chunk;
    const unsigned n_heads = min(p.group_chunk, group - chunk * p.group_chunk);
    const unsigned counter = s * gridDim.y + blockIdx.y;
    if (n_valid > 1 && (counters == nullptr || counter >= QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS)) {
        __trap();  // no counter for this merge
    }

    // This warp's steps: warp, warp + 4, ... below n_steps.
    const unsigned n_steps = ceil_div(k_end - k_begin, (unsigned)PIPE_KEYS);
    const unsigned my_steps = warp < n_steps ? ceil_div(n_steps - warp, (unsigned)PIPE_WARPS) : 0u;
    uint32_t next_window =
        pipe_table_window(block_tables, table, first_block, warp, lane, 1, p.max_blocks_per_seq);

    // The ring: per warp PIPE_STAGES stages of K [16][LD] then V [16][LD].
    bf16* ring = reinterpret_cast<bf16*>(s_raw) + warp * PIPE_STAGES * L::STAGE_ELEMS;
    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    // This lane's copies: rows lane / VECS + KEYS_PER_PASS * c, chunk lane % VECS.
    const unsigned lane_key = lane / VECS;
    const unsigned lane_vec = (lane % VECS) * QILIN_VEC_ELEMS;
    const size_t lane_offset = lane_key * kv_stride + (size_t)kv_head * D + lane_vec;
    const uint32_t lane_dst = smem_u32(ring + lane_key * LD + lane_vec);
    const unsigned num_cache_blocks = p.cache_slots / QILIN_BLOCK_SIZE;

    // Queues the copies of this warp's step i into stage i % PIPE_STAGES; keys >= k_end
    // become zeros. Warp-uniform: every lane takes part in the shuffle.
    auto issue = [&](unsigned i) {
        if (i % QILIN_WARP_SIZE == 0 && i > 0) {
            window = next_window;  // steps i .. i + 31
            next_window = pipe_table_window(block_tables, table, first_block, warp, lane,
                                            i / QILIN_WARP_SIZE + 1, p.max_blocks_per_seq);
        }
        const uint32_t block = pipe_table_entry(window, i);
        const unsigned step = warp + i * PIPE_WARPS;
        if (first_block + step >= p.max_blocks_per_seq || block >= num_cache_blocks) {
            __trap();  // a position past the table or a block past the cache
        }
        const unsigned base = k_begin + step * PIPE_KEYS;
        const unsigned keys_left = k_end - base;  // >= 1
        const size_t src0 = (size_t)block * QILIN_BLOCK_SIZE * kv_stride + lane_offset;
        const uint32_t dst0 = lane_dst + (i % PIPE_STAGES) * L::STAGE_ELEMS * (int)sizeof(bf16);
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            const unsigned key = lane_key + c * KEYS_PER_PASS;
            const bool valid = key < keys_left;
            const size_t src = src0 + (size_t)c * KEYS_PER_PASS * kv_stride;
            const uint32_t dst = dst0 + c * KEYS_PER_PASS * LD * (int)sizeof(bf16);
            cp_async_16(dst, valid ? k_cache + src : k_cache, valid ? 16u : 0u);
            cp_async_16(dst + PIPE_KEYS * LD * (int)sizeof(bf16), valid ? v_cache + src : v_cache,
                        valid ? 16u : 0u);
        }
    };

    // The first stages go out before the query is even loaded: they are the long trips.
#pragma unroll
    for (int i = 0; i < PIPE_STAGES - 1; ++i) {
        if ((unsigned)i < my_steps) {
            issue(i);
        }
        cp_async_commit();  // empty groups too: the wait below counts groups
    }

    const unsigned r0 = lane / 4;  // this lane's two rows (heads head0 + r) of the tile
    const unsigned r1 = r0 + 8;
    const unsigned c0 = (lane % 4) * 2;  // this lane's first column of every fragment
    // Q as mma A fragments: row r is head head0 + r of the row's query (heads are D apart).
    const size_t q_stride = (size_t)p.num_heads * D;
    uint32_t qa[D / 16][4];
    decode_tile_load_q<D>(qa, q + (size_t)row * q_stride + (size_t)head0 * D, r0, r1, c0, n_heads);
    float o[D / 8][4];  // output accumulators, C layout, 8 dims per n-tile
    decode_tile_zero<D>(o);
    float m0 = -INFINITY;  // running max (log2 domain) of rows r0 and r1
    float m1 = -INFINITY;
    float l0 = 0.0f;  // running sums of this lane's columns; the quad is summed at the end
    float l1 = 0.0f;
    const float scale_log2 = p.scale * QILIN_LOG2E;
    const bf16* ring_k = ring;

    for (unsigned i = 0; i < my_steps; ++i) {
        // Refill the stage step i - 1 used (every lane finished reading it: the
        // __syncwarp at the end of the last iteration) with step i + STAGES - 1.
        if (i + PIPE_STAGES - 1 < my_steps) {
            issue(i + PIPE_STAGES - 1);
        }
        cp_async_commit();
        cp_async_wait<PIPE_STAGES - 1>();  // this lane's copies of step i have landed ...
        __syncwarp();                      // ... and every lane's

        const bf16* s_k = ring_k + (i % PIPE_STAGES) * L::STAGE_ELEMS;
        const bf16* s_v = s_k + PIPE_KEYS * LD;
        const unsigned base = k_begin + (warp + i * PIPE_WARPS) * PIPE_KEYS;

        float sc[2][4];
        decode_tile_scores<D, LD>(sc, qa, s_k, lane);
        float corr0, corr1;
        decode_tile_softmax(sc, base, k_end, c0, scale_log2, m0, m1, l0, l1, corr0, corr1);
        // Once the running maxima settle, most steps leave every row's factor at 1: skip
        // the 64 multiplies then (a warp-uniform branch).
        if (__any_sync(FULL_MASK, corr0 != 1.0f || corr1 != 1.0f)) {
            decode_tile_rescale<D>(o, corr0, corr1);
        }
        decode_tile_pv<D, LD>(o, sc, s_v, lane);
        __syncwarp();  // every lane is done reading this stage before it is refilled
    }
    cp_async_wait<0>();  // nothing of this warp may still land in the ring reused below

    decode_tile_merge_warps<D, PIPE_WARPS>(p, o, m0, m1, l0, l1, s_raw, s_m, s_l, warp, lane, s,
                                           row, head0, n_heads, blockIdx.z, n_valid == 1, out,
                                           part_out, part_ml);
    if (n_valid == 1) {
        return;
    }

    // Count this split done; the last of the n_valid merges. The fence orders this
    // block's partials before its count for every other block (the classic
    // threadFenceReduction pattern); the merging block reads them through L2 (__ldcg),
    // never through an L1 line that could predate them.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned done = atomicAdd(counters + counter, 1u);
        s_last = done == n_valid - 1;
    }
    __syncthreads();
    if (!s_last) {
        return;
    }
    __threadfence();

    // Per head: M = max_z m_z and L = sum_z exp2(m_z - M) l_z (a warp per head, lanes
    // over the splits; every split z < n_valid was written and has a finite m).
    const size_t part_head0 = ((size_t)s * p.num_heads + head0) * p.n_splits;
    const float2* ml = reinterpret_cast<const float2*>(part_ml);
    for (unsigned h = warp; h < n_heads; h += PIPE_WARPS) {
        const size_t part0 = part_head0 + (size_t)h * p.n_splits;
        float m_h = -INFINITY;
        for (unsigned z = lane; z < n_valid; z += QILIN_WARP_SIZE) {
            m_h = fmaxf(m_h, __ldcg(ml + part0 + z).x);
        }
#pragma unroll
        for (int offset = QILIN_WARP_SIZE / 2; offset > 0; offset /= 2) {
            m_h = fmaxf(m_h, __shfl_xor_sync(FULL_MASK, m_h, offset));
        }
        float l_h = 0.0f;
        for (unsigned z = lane; z < n_valid; z += QILIN_WARP_SIZE) {
            const float2 v = __ldcg(ml + part0 + z);
            l_h += v.y * exp2f(v.x - m_h);
        }
#pragma unroll
        for (int offset = QILIN_WARP_SIZE / 2; offset > 0; offset /= 2) {
            l_h += __shfl_xor_sync(FULL_MASK, l_h, offset);
        }
        if (lane == 0) {
            s_head_m[h] = m_h;
            s_head_l[h] = l_h;
        }
    }
    __syncthreads();

    // out = sum_z exp2(m_z - M) O_z / L, four dims per thread and item; MERGE_UNROLL
    // splits' loads in flight per item keep the L2 pipe of this one SM busy.
    constexpr int MERGE_UNROLL = 8;
    constexpr unsigned QUADS = D / 4;
    const float4* po = reinterpret_cast<const float4*>(part_out);
    for (unsigned item = threadIdx.x; item < n_heads * QUADS; item += PIPE_THREADS) {
        const unsigned h = item / QUADS;
        const unsigned quad = item % QUADS;
        const size_t part0 = part_head0 + (size_t)h * p.n_splits;
        const float m_h = s_head_m[h];
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        unsigned z = 0;
        for (; z + MERGE_UNROLL <= n_valid; z += MERGE_UNROLL) {
            float4 v[MERGE_UNROLL];
            float w[MERGE_UNROLL];
#pragma unroll
            for (int u = 0; u < MERGE_UNROLL; ++u) {
                v[u] = __ldcg(po + (part0 + z + u) * QUADS + quad);
                w[u] = __ldcg(ml + part0 + z + u).x;
            }
#pragma unroll
            for (int u = 0; u < MERGE_UNROLL; ++u) {
                const float f = exp2f(w[u] - m_h);
                acc.x = fmaf(v[u].x, f, acc.x);
                acc.y = fmaf(v[u].y, f, acc.y);
                acc.z = fmaf(v[u].z, f, acc.z);
                acc.w = fmaf(v[u].w, f, acc.w);
            }
        }
        for (; z < n_valid; ++z) {
            const float4 v = __ldcg(po + (part0 + z) * QUADS + quad);
            const float f = exp2f(__ldcg(ml + part0 + z).x - m_h);
            acc.x = fmaf(v.x, f, acc.x);
            acc.y = fmaf(v.y, f, acc.y);
            acc.z = fmaf(v.z, f, acc.z);
            acc.w = fmaf(v.w, f, acc.w);
        }
        const float l_h = s_head_l[h];  // >= 1: the split holding the max contributes 1
        __nv_bfloat162 lo = __floats2bfloat162_rn(acc.x / l_h, acc.y / l_h);
        __nv_bfloat162 hi = __floats2bfloat162_rn(acc.z / l_h, acc.w / l_h);
        uint2 packed;
        packed.x = *reinterpret_cast<const uint32_t*>(&lo);
        packed.y = *reinterpret_cast<const uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(out + row * q_stride + (size_t)(head0 + h) * D + quad * 4) =
            packed;
    }
    if (threadIdx.x == 0) {
        counters[counter] = 0u;  // every split of this merge has counted: ready for reuse
    }
}

// out:          bf16 [n_tokens, num_heads * D]   decode rows written
// part_out:     f32  [n_seqs, num_heads, n_splits, D] unnormalised partial outputs
//               (exp2-weighted by the split's own max); unused (may be NULL) when n_splits == 1
// part_ml:      f32  [n_seqs, num_heads, n_splits, 2] each split's (max m, sum l) in the log2
//               domain; unused (may be NULL) when n_splits == 1
// counters:     u32  [>= n_seqs * gridDim.y] zero at launch, zero again at exit; unused
//               (may be NULL) when n_splits == 1
// q:            bf16 [n_tokens, num_heads * D]
// k_cache:      bf16 [cache_slots, num_kv_heads * D]  one layer's keys
// v_cache:      bf16 [cache_slots, num_kv_heads * D]  one layer's values
// seq_starts:   u32  [n_seqs + 1]  first row of each sequence, then n_tokens
// context_lens: u32  [n_seqs]      cached tokens of each sequence including this step's
// block_tables: u32  [n_seqs, max_blocks_per_seq]
// D = 128. Registers: Q fragments 32, O 64; 2 blocks per SM (the ring's 102 KiB each).
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_DECODE_PIPE_THREADS, 2)
qilin_attention_decode_pipe_hd128_bf16(const QilinAttentionParams p,
                                       bf16* __restrict__ out,
                                       float* __restrict__ part_out,
                                       float* __restrict__ part_ml,
                                       unsigned* __restrict__ counters,
                                       const bf16* __restrict__ q,
                                       const bf16* __restrict__ k_cache,
                                       const bf16* __restrict__ v_cache,
                                       const uint32_t* __restrict__ seq_starts,
                                       const uint32_t* __restrict__ context_lens,
                                       const uint32_t* __restrict__ block_tables) {
    QILIN_PDL_ENTRY();
    attention_decode_pipe<128>(p, out, part_out, part_ml, counters, q, k_cache, v_cache,
                               seq_starts, context_lens, block_tables);
}

// As qilin_attention_decode_pipe_hd128_bf16 for D = 64 (54 KiB of ring: 4 blocks per SM).
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_DECODE_PIPE_THREADS, 4)
qilin_attention_decode_pipe_hd64_bf16(const QilinAttentionParams p,
                                      bf16* __restrict__ out,
                                      float* __restrict__ part_out,
                                      float* __restrict__ part_ml,
                                      unsigned* __restrict__ counters,
                                      const bf16* __restrict__ q,
                                      const bf16* __restrict__ k_cache,
                                      const bf16* __restrict__ v_cache,
                                      const uint32_t* __restrict__ seq_starts,
                                      const uint32_t* __restrict__ context_lens,
                                      const uint32_t* __restrict__ block_tables) {
    QILIN_PDL_ENTRY();
    attention_decode_pipe<64>(p, out, part_out, part_ml, counters, q, k_cache, v_cache,
                              seq_starts, context_lens, block_tables);
}
