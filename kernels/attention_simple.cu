// Paged causal attention, the plain-FMA fallback of the tensor-core kernels
// (kernels/attention_prefill.cu, same semantics, written out there): any head_dim that is
// a multiple of 8 up to QILIN_ATTN_MAX_HEAD_DIM, any row. The launcher uses it for head
// sizes without a tensor-core kernel, and for every row with QILIN_ATTN_SIMPLE=1
// (bisecting a parity failure). CPU twin: backend::cpu::attention::paged_attention.
//
// Launch contract (checked by the Rust launcher; violations trap): D % 8 == 0,
// D <= QILIN_ATTN_MAX_HEAD_DIM, blockDim.x == 32, num_heads % num_kv_heads == 0,
// seq_starts[0] == 0 and non-decreasing, len <= ctx for every sequence.

#include "attention_common.cuh"

// grid = (n_tokens, num_heads), block = 32 (one warp). Lane l owns
// dims l, l + 32, ... of the row; keys are visited in order with an online softmax in the
// natural-exponent domain (expf), as close to the CPU twin's arithmetic as a warp allows.
//
// out:          bf16 [n_tokens, num_heads * D]   rows of the served sequences written
// q:            bf16 [n_tokens, num_heads * D]
// k_cache:      bf16 [cache_slots, num_kv_heads * D]  one layer's keys
// v_cache:      bf16 [cache_slots, num_kv_heads * D]  one layer's values
// seq_starts:   u32  [n_seqs + 1]  first row of each sequence, then n_tokens
// context_lens: u32  [n_seqs]      cached tokens of each sequence including this step's
// block_tables: u32  [n_seqs, max_blocks_per_seq]
// token_seq:    u32  [n_tokens]  sequence index of each row
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_SIMPLE_THREADS)
qilin_attention_prefill_simple_bf16(const QilinAttentionParams p,
                                    bf16* __restrict__ out,
                                    const bf16* __restrict__ q,
                                    const bf16* __restrict__ k_cache,
                                    const bf16* __restrict__ v_cache,
                                    const uint32_t* __restrict__ seq_starts,
                                    const uint32_t* __restrict__ context_lens,
                                    const uint32_t* __restrict__ block_tables,
                                    const uint32_t* __restrict__ token_seq) {
    QILIN_PDL_ENTRY();
    constexpr int PER_LANE = QILIN_ATTN_MAX_HEAD_DIM / QILIN_WARP_SIZE;
    const unsigned D = p.head_dim;
    if (blockDim.x != QILIN_WARP_SIZE || D == 0 || D % QILIN_VEC_ELEMS != 0 ||
        D > QILIN_ATTN_MAX_HEAD_DIM || p.num_kv_heads == 0 || p.num_heads % p.num_kv_heads != 0) {
        __trap();
    }
    const unsigned t = blockIdx.x;
    const unsigned head = blockIdx.y;
    if (t >= p.n_tokens || head >= p.num_heads) {
        return;
    }
    const unsigned s = token_seq[t];
    if (s >= p.n_seqs) {
        __trap();
    }
    const unsigned start = seq_starts[s];
    const unsigned len = seq_starts[s + 1] - start;
    if (t < start || t - start >= len) {
        __trap();  // token_seq and seq_starts disagree
    }
    if (len == 1 && p.skip_decode_rows != 0) {
        return;
    }
    const unsigned ctx = context_lens[s];
    if (ctx < len) {
        __trap();
    }
    const unsigned pos = ctx - len + (t - start);
    const unsigned kv_head = head / (p.num_heads / p.num_kv_heads);
    const unsigned lane = threadIdx.x;

    const size_t q_stride = (size_t)p.num_heads * D;
    const bf16* q_row = q + (size_t)t * q_stride + (size_t)head * D;
    float qf[PER_LANE];
    float acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const unsigned d = lane + i * QILIN_WARP_SIZE;
        qf[i] = d < D ? __bfloat162float(q_row[d]) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY;
    float l = 0.0f;
    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const uint32_t* table = block_tables + (size_t)s * p.max_blocks_per_seq;
    for (unsigned j = 0; j <= pos; ++j) {
        const size_t at = attention_cache_slot(table, j, p) * kv_stride + (size_t)kv_head * D;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const unsigned d = lane + i * QILIN_WARP_SIZE;
            if (d < D) {
                dot = fmaf(qf[i], __bfloat162float(k_cache[at + d]), dot);
            }
        }
        const float score = warp_reduce_sum(dot) * p.scale;
        if (score > m) {
            const float c = expf(m - score);  // m = -inf: 0
            l *= c;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                acc[i] *= c;
            }
            m = score;
        }
        const float pr = expf(score - m);
        l += pr;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const unsigned d = lane + i * QILIN_WARP_SIZE;
            if (d < D) {
                acc[i] = fmaf(pr, __bfloat162float(v_cache[at + d]), acc[i]);
            }
        }
    }
    bf16* out_row = out + (size_t)t * q_stride + (size_t)head * D;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const unsigned d = lane + i * QILIN_WARP_SIZE;
        if (d < D) {
            out_row[d] = __float2bfloat16_rn(acc[i] / l);
        }
    }
}
