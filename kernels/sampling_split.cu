// Split sampling: greedy argmax (qilin_argmax_split_bf16) and temperature / top-k / top-p /
// min-p sampling (qilin_sample_split_bf16) of each logits row by several blocks per row,
// opt-in with QILIN_CUDA_SAMPLE_SPLIT=1 until a GPU run verifies them. Same semantics as
// qilin_argmax_bf16 and qilin_sample_bf16 (kernels/sampling.cu, sampling_common.cuh), so
// the same CPU twins: CpuBackend::argmax_rows and CpuBackend::sample_rows.
//
// Why. One block per row reads the row once per pass from one SM: on an H200, argmax of
// one 152,064-entry row took 55 us and Qwen's default sampling (top_k 20, top_p 0.8) 273 us
// whatever the batch up to 64 rows (bench/results/2026-11-26-h200-b908988.md), against a
// 4.3 ms decode step at batch 1. The row is 304 KB: ~0.1 us of the device's bandwidth.
// Sixteen passes of ~16 us (each a chain of latency-bound L2 reads by one SM) are the cost.
//
// How (one block = one row x one chunk of `chunk` elements, QILIN_SAMPLE_THREADS threads):
//   1. every thread loads its QILIN_SAMPLE_SPLIT_VECS x 8 keys (sample_key) into registers
//      with 16-byte loads, all in flight at once: the chunk is read from memory once;
//   2. the chunk's largest key at its first index; for a greedy row (and the argmax kernel)
//      that is all;
//   3. the chunk's threshold t: its QILIN_SAMPLE_SPLIT_TOP-th largest key (the search of
//      sample_topk_key over the registers), 1 (all) when it holds fewer keys, t + 1 when
//      t's ties would take more than QILIN_SAMPLE_SPLIT_CAP slots; its candidates, every
//      key >= t, are written in id order (three block scans) as (key << 16) | offset in
//      the chunk;
//   4. rows without top-k: the chunk's mass relative to its own maximum;
//   5. the block counts itself done on the row's counter; the last merges:
//        - the row's largest key and argmax from the chunks' (greedy rows: done);
//        - top-k: kk over the candidates. Every key >= T* (the largest chunk threshold) is
//          a candidate, so counts from T* up are the row's: kk is exact when kk >= T*, and
//          kk < T* whenever the row's is (then the row falls back to the one-block
//          algorithm, run by this block). With k <= TOP only ties overflowing a chunk's
//          slots can raise T* above the row's k-th key: a key >= it has fewer than k keys
//          above it in its chunk too, so it is >= its chunk's TOP-th key;
//        - top-p: the cut v0 and its kept ties over the candidates (sample_topp_cut), the
//          mass of K from the candidates (top-k) or from the chunks' masses, each rescaled
//          by exp((m_chunk - m) / T) in f64 (no top-k). As for top-k, the cut is exact
//          when v0 >= T*; otherwise (a flat row whose top-p mass spreads past the
//          candidates) the row falls back;
//        - the draw over the candidates in id order (one tile of QILIN_SAMPLE_THREADS x 8):
//          the survivors' mass, the first survivor whose running sum exceeds u * mass, the
//          last survivor when rounding leaves none.
//      Rows with temperature alone (no top-k, no top-p, no min-p: the OpenAI API's default)
//      skip the candidates: the merge picks the chunk where u * (sum of the rescaled chunk
//      masses) falls and walks that chunk of the row (sample_walk, as sample_row's last
//      step). Rows the split cannot take (top_k > TOP, or min-p without top-k and top-p)
//      run the one-block algorithm in their first block; the others return at once.
// Masses are f64 as in sample_row; the chunks' rescaled masses differ from the host's sum
// by ~1e-7 relative (f32 exponentials of another difference), inside the 5e-5 tolerance of
// tests/gpu_sampling.rs. Argmax and top-k are comparisons: exact.
//
// Napkin math (H200, 132 SMs, 4.26 TB/s): a 152,064-entry row is 13 chunks of 11,698; one
// block loads its 23 KB in one round trip (~1 us), then ~6 search passes over registers
// (~0.3 us each: 168 compares and 7 block sums), 3 scans, the counter's round trip (~1 us)
// and the merge (~300 candidates: ~6 block-wide passes over shared memory, ~0.2 us each):
// ~6-10 us per row, rows in parallel up to ~130 blocks at once.
//
// Launch: grid = (rows, splits, 1), block = (QILIN_SAMPLE_THREADS, 1, 1), no dynamic
// shared memory. counters: >= rows entries, all 0 at launch, 0 again at exit.

#include "common.cuh"
#include "sampling_common.cuh"

static constexpr int SPLIT_VECS = QILIN_SAMPLE_SPLIT_VECS;
static constexpr int SPLIT_ITEMS = SPLIT_VECS * 8;  // keys per thread
static constexpr int SPLIT_TOP = QILIN_SAMPLE_SPLIT_TOP;
static constexpr int SPLIT_CAP = QILIN_SAMPLE_SPLIT_CAP;
static constexpr int SPLIT_MERGE = QILIN_SAMPLE_SPLIT_MAX_BLOCKS * SPLIT_CAP;  // candidates
static_assert(QILIN_SAMPLE_SPLIT_CHUNK == QILIN_SAMPLE_THREADS * SPLIT_ITEMS,
              "abi.h: a chunk is every thread's keys");
static_assert(QILIN_SAMPLE_SPLIT_CHUNK <= 65536, "a candidate's offset in its chunk fits 16 bits");
static_assert(SPLIT_TOP <= SPLIT_CAP, "a chunk's top keys fit its candidate slots");
static_assert(SPLIT_MERGE == QILIN_SAMPLE_THREADS * 8,
              "the merge draws over every candidate in one tile of 8 per thread");

// This block's keys in registers: key[v * 8 + e] is element begin + (v * THREADS + tid) * 8
// + e of the row, 0 past `end` (below every real key: those run from 0x007f, -inf).
QILIN_DEVICE void split_load_keys(const unsigned short* x, unsigned begin, unsigned end,
                                  unsigned (&key)[SPLIT_ITEMS]) {
    const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;  // begin: a multiple of 8
    uint4 w[SPLIT_VECS];
#pragma unroll
    for (int v = 0; v < SPLIT_VECS; ++v) {  // every load issued before any is used
        const unsigned i = begin + (v * QILIN_SAMPLE_THREADS + threadIdx.x) * 8;
        w[v] = aligned && i + 8 <= end ? __ldg(reinterpret_cast<const uint4*>(x + i))
                                       : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int v = 0; v < SPLIT_VECS; ++v) {
        const unsigned i = begin + (v * QILIN_SAMPLE_THREADS + threadIdx.x) * 8;
        const unsigned words[4] = {w[v].x, w[v].y, w[v].z, w[v].w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const unsigned bits = e % 2 == 0 ? words[e / 2] & 0xffffu : words[e / 2] >> 16;
            if (aligned && i + 8 <= end) {
                key[v * 8 + e] = sample_key(bits);
            } else {
                key[v * 8 + e] = i + e < end ? sample_load_key(x, i + e) : 0u;
            }
        }
    }
}

// Row index of key[j] (see split_load_keys).
QILIN_DEVICE unsigned split_index(unsigned begin, int j) {
    return begin + ((j / 8) * QILIN_SAMPLE_THREADS + threadIdx.x) * 8 + j % 8;
}

template <bool ARGMAX_ONLY>
QILIN_DEVICE void sample_split(const QilinSampleSplitParams& p,
                               uint32_t* __restrict__ ids,
                               const QilinSampleRow* __restrict__ rows,
                               QilinSampleSplitPart* __restrict__ parts,
                               uint32_t* __restrict__ cands,
                               uint32_t* __restrict__ counters,
                               const bf16* __restrict__ logits) {
    __shared__ unsigned long long s_l[SAMPLE_WARPS];
    __shared__ double s_d[SAMPLE_WARPS];
    __shared__ unsigned s_u[SAMPLE_WARPS];
    __shared__ unsigned s_pu[SAMPLE_PROBES * SAMPLE_WARPS];
    __shared__ double s_pd[SAMPLE_PROBES * SAMPLE_WARPS];
    __shared__ unsigned s_last;
    __shared__ unsigned s_found;
    __shared__ QilinSampleSplitPart s_part[QILIN_SAMPLE_SPLIT_MAX_BLOCKS];
    __shared__ unsigned short s_ckey[SPLIT_MERGE];  // the row's candidates, in id order
    __shared__ unsigned s_cid[SPLIT_MERGE];

    if (blockDim.x != QILIN_SAMPLE_THREADS || p.splits == 0 ||
        p.splits > QILIN_SAMPLE_SPLIT_MAX_BLOCKS || p.splits != gridDim.y || p.chunk % 8 != 0 ||
        p.chunk > QILIN_SAMPLE_SPLIT_CHUNK || (size_t)p.splits * p.chunk < p.cols ||
        (size_t)(p.splits - 1) * p.chunk >= p.cols ||
        p.cols == 0 || p.rows > QILIN_SAMPLE_SPLIT_MAX_ROWS) {
        __trap();
    }
    const unsigned row = blockIdx.x;
    const unsigned z = blockIdx.y;
    if (row >= p.rows) {
        return;
    }
    const unsigned tid = threadIdx.x;
    const unsigned cols = p.cols;
    const unsigned short* x = reinterpret_cast<const unsigned short*>(logits) + (size_t)row * cols;
    QilinSampleRow rp;
    if (ARGMAX_ONLY) {
        rp = QilinSampleRow{0.0, 0.0f, 0u, 1.0f, 0.0f};
    } else {
        rp = rows[row];
    }
    const bool greedy = !(rp.inv_t > 0.0f);
    const bool topk_on = rp.top_k > 0 && rp.top_k < cols;
    // Temperature alone (the OpenAI API's default): every key survives; the draw needs only
    // the chunks' masses and a walk through one chunk.
    const bool temp_only = !greedy && !topk_on && !(rp.top_p < 1.0f) && !(rp.min_p > 0.0f);
    const bool split_row =
        greedy || temp_only || (topk_on ? rp.top_k <= SPLIT_TOP : rp.top_p < 1.0f);
    if (!split_row) {
        if (z == 0) {
            sample_row(rp, x, cols, ids + row);
        }
        return;
    }

    // 1-4: this chunk.
    const unsigned begin = z * p.chunk;
    const unsigned end = min(begin + p.chunk, cols);  // > begin: every chunk starts inside
    unsigned key[SPLIT_ITEMS];
    split_load_keys(x, begin, end, key);
    unsigned long long best = 0;
#pragma unroll
    for (int j = 0; j < SPLIT_ITEMS; ++j) {
        const unsigned long long c =
            ((unsigned long long)key[j] << 32) | (unsigned long long)(~split_index(begin, j));
        best = key[j] != 0 && c > best ? c : best;
    }
    best = sample_block_max_u64(best, s_l);
    QilinSampleSplitPart part{best, 0.0, 0u, 0u};
    if (!greedy) {  // the chunk's mass, for rows without top-k
        const float m_chunk = sample_value((unsigned)(best >> 32));
        if (!topk_on && m_chunk != -INFINITY) {
            double mass = 0.0;
#pragma unroll
            for (int j = 0; j < SPLIT_ITEMS; ++j) {
                mass += key[j] != 0 ? (double)sample_prob(key[j], m_chunk, rp.inv_t) : 0.0;
            }
            part.mass = sample_block_sum(mass, s_d);
        }
    }
    if (!greedy && !temp_only) {  // the candidates
        const unsigned chunk_max = (unsigned)(best >> 32);
        const auto scan_keys = [&](auto f) {
#pragma unroll
            for (int j = 0; j < SPLIT_ITEMS; ++j) {
                if (key[j] != 0) {
                    f(key[j], 0u);
                }
            }
        };
        const auto count_from = [&](unsigned t) {
            unsigned mine = 0;
#pragma unroll
            for (int j = 0; j < SPLIT_ITEMS; ++j) {
                mine += key[j] >= t;  // padding (0) never: thresholds are >= 1
            }
            return sample_block_sum(mine, s_u);
        };
        // Keys >= 1 are the chunk's real ones: with at most TOP of them, all are candidates.
        part.threshold =
            end - begin > SPLIT_TOP ? sample_topk_key(scan_keys, SPLIT_TOP, chunk_max, s_pu) : 1u;
        part.count = count_from(part.threshold);
        if (part.count > SPLIT_CAP) {
            // The threshold's ties overflow the slots: keep the keys above it (fewer than
            // TOP), complete from threshold + 1 on; the merge checks that this suffices.
            part.threshold += 1;
            part.count = count_from(part.threshold);
        }
        {
            uint32_t* slots = cands + ((size_t)row * p.splits + z) * SPLIT_CAP;
            unsigned base = 0;
#pragma unroll
            for (int v = 0; v < SPLIT_VECS; ++v) {  // vector v of every thread, then v + 1
                unsigned here = 0;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    here += key[v * 8 + e] >= part.threshold;
                }
                unsigned total;
                unsigned at = base + sample_block_scan(here, s_u, &total);
                base += total;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int j = v * 8 + e;
                    if (key[j] >= part.threshold) {
                        slots[at++] = (key[j] << 16) | (split_index(begin, j) - begin);
                    }
                }
            }
        }
    }

    // 5: count this chunk done; the last block of the row merges (the fence orders this
    // block's part and candidates before its count; the merge reads them through L2).
    if (p.splits > 1) {
        if (tid == 0) {
            parts[(size_t)row * p.splits + z] = part;
        }
        __threadfence();
        __syncthreads();
        if (tid == 0) {
            s_last = atomicAdd(counters + row, 1u) == p.splits - 1;
        }
        __syncthreads();
        if (!s_last) {
            return;
        }
        __threadfence();
        if (tid < p.splits) {
            const QilinSampleSplitPart* src = parts + (size_t)row * p.splits + tid;
            s_part[tid].best = __ldcg(&src->best);
            s_part[tid].mass = __ldcg(&src->mass);
            s_part[tid].threshold = __ldcg(&src->threshold);
            s_part[tid].count = __ldcg(&src->count);
        }
        if (tid == 0) {
            counters[row] = 0u;  // every chunk has counted: ready for the next launch
        }
    } else if (tid == 0) {
        s_part[0] = part;
    }
    __syncthreads();

    unsigned long long row_best = 0;
    unsigned n_cands = 0;
    unsigned floor_key = 0;  // every key >= it is a candidate
    for (unsigned b = 0; b < p.splits; ++b) {
        row_best = s_part[b].best > row_best ? s_part[b].best : row_best;
        n_cands += s_part[b].count;
        floor_key = max(floor_key, s_part[b].threshold);
    }
    const unsigned max_key = (unsigned)(row_best >> 32);
    const unsigned argmax = ~(unsigned)row_best;
    const float m = sample_value(max_key);
    const float inv_t = rp.inv_t;
    if (greedy || m == -INFINITY) {
        if (tid == 0) {
            ids[row] = greedy ? argmax : 0u;
        }
        return;
    }

    const float min_p = fminf(rp.min_p, 1.0f);
    if (tid == 0) {
        s_found = 0xffffffffu;  // for sample_walk; barriers follow before it runs
    }
    // The chunks' masses relative to the row's maximum (rows without top-k).
    const auto chunk_mass = [&](unsigned b) {
        const float m_b = sample_value((unsigned)(s_part[b].best >> 32));
        return m_b != -INFINITY ? s_part[b].mass * exp(((double)m_b - (double)m) * (double)inv_t)
                                : 0.0;
    };
    if (temp_only) {
        // The chunk where u * total falls (the last with mass when rounding runs out, as in
        // sample_row), then the walk through it from the mass of the chunks before.
        double total = 0.0;
        for (unsigned b = 0; b < p.splits; ++b) {
            total += chunk_mass(b);
        }
        const double target = rp.u * total;
        double acc = 0.0;
        double base = 0.0;
        unsigned chosen = 0;
        for (unsigned b = 0; b < p.splits; ++b) {
            const double mass = chunk_mass(b);
            if (mass > 0.0) {
                chosen = b;
                base = acc;
                acc += mass;
                if (acc > target) {
                    break;
                }
            }
        }
        __syncthreads();  // s_found
        const unsigned walk_begin = chosen * p.chunk;
        const unsigned walk_end = min(walk_begin + p.chunk, cols);
        const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
        const auto load_row = [&](unsigned start, unsigned (&k)[QILIN_SAMPLE_WALK_ITEMS]) {
            sample_load_walk_keys(x, aligned, start, walk_end, k);
        };
        sample_walk(load_row, [](unsigned i) { return i; }, walk_begin, walk_end, base, target,
                    0u, 0xffffffffu, 0u, m, inv_t, min_p, s_d, s_u, s_l, &s_found, ids + row);
        return;
    }

    // The candidates into shared memory, chunk by chunk: id order.
    for (unsigned i = tid; i < n_cands; i += QILIN_SAMPLE_THREADS) {
        unsigned b = 0;
        unsigned before = 0;
        while (i >= before + s_part[b].count) {
            before += s_part[b].count;
            ++b;
        }
        const uint32_t c = __ldcg(cands + ((size_t)row * p.splits + b) * SPLIT_CAP + (i - before));
        s_ckey[i] = (unsigned short)(c >> 16);
        s_cid[i] = b * p.chunk + (c & 0xffffu);
    }
    __syncthreads();
    const auto scan_cands = [&](auto f) {
        for (unsigned i = tid; i < n_cands; i += QILIN_SAMPLE_THREADS) {
            f((unsigned)s_ckey[i], s_cid[i]);
        }
    };

    const unsigned kk = topk_on ? sample_topk_key(scan_cands, rp.top_k, max_key, s_pu) : 0u;
    // Over the candidates, counts of keys >= floor_key are the row's: kk is the row's k-th
    // largest key when it is >= floor_key, and below floor_key whenever the row's is (then
    // the k-th largest lies among keys a chunk dropped: the whole row it is).
    bool whole_row = topk_on && kk < floor_key;
    unsigned v0 = kk;
    unsigned keep_ties = 0xffffffffu;
    if (!whole_row && rp.top_p < 1.0f) {
        double mass_k = 0.0;
        if (topk_on) {
            scan_cands([&](unsigned k, unsigned) {
                mass_k += k >= kk ? (double)sample_prob(k, m, inv_t) : 0.0;
            });
            mass_k = sample_block_sum(mass_k, s_d);
        } else {
            for (unsigned b = 0; b < p.splits; ++b) {
                mass_k += chunk_mass(b);
            }
        }
        const double top_p = (double)fmaxf(rp.top_p, 1.17549435e-38f);  // f32::MIN_POSITIVE
        const double target = top_p * mass_k;
        sample_topp_cut(scan_cands, kk, max_key, target, m, inv_t, s_pd, s_d, s_u, v0,
                        keep_ties);
        // Likewise the cut (with top-k, v0 >= kk >= floor_key).
        whole_row = v0 < floor_key;
    }
    if (whole_row) {
        sample_row(rp, x, cols, ids + row);  // one block, this one
        return;
    }

    // The draw over the candidates (id order): the survivors' mass (keys above v0 not
    // below min-p, and v0's kept ties), then the walk.
    double above = 0.0;
    unsigned ties = 0;
    scan_cands([&](unsigned k, unsigned) {
        if (k > v0) {
            const float pk = sample_prob(k, m, inv_t);
            above += !(pk < min_p) ? (double)pk : 0.0;
        }
        ties += k == v0;
    });
    above = sample_block_sum(above, s_d);
    ties = sample_block_sum(ties, s_u);
    const unsigned kept_ties = min(ties, keep_ties);
    const float p_v0 = kept_ties > 0 ? sample_prob(v0, m, inv_t) : 0.0f;
    const double total = above + (!(p_v0 < min_p) ? (double)kept_ties * (double)p_v0 : 0.0);
    const auto load_cands = [&](unsigned start, unsigned (&k)[QILIN_SAMPLE_WALK_ITEMS]) {
#pragma unroll
        for (int j = 0; j < QILIN_SAMPLE_WALK_ITEMS; ++j) {
            k[j] = start + j < n_cands ? (unsigned)s_ckey[start + j] : 0u;
        }
    };
    // The survivors include the best token (p = 1, first in top-p's order, min-p <= 1), so
    // the walk's answer is a candidate's position.
    sample_walk(load_cands, [&](unsigned i) { return s_cid[i]; }, 0u, n_cands, 0.0,
                rp.u * total, v0, keep_ties, 0u, m, inv_t, min_p, s_d, s_u, s_l, &s_found,
                ids + row);
}

// ids:      u32                  [rows]                  the greedy choice of each row
// parts:    QilinSampleSplitPart [rows, splits]          scratch (unused when splits == 1)
// counters: u32                  [>= rows]               0 at launch, 0 again at exit
// logits:   bf16                 [rows, cols]
extern "C" __global__ void __launch_bounds__(QILIN_SAMPLE_THREADS, 1)
qilin_argmax_split_bf16(const QilinSampleSplitParams p,
                        uint32_t* __restrict__ ids,
                        QilinSampleSplitPart* __restrict__ parts,
                        uint32_t* __restrict__ counters,
                        const bf16* __restrict__ logits) {
    QILIN_PDL_ENTRY();
    sample_split<true>(p, ids, nullptr, parts, nullptr, counters, logits);
}

// ids:      u32                  [rows]                  the chosen token of each row
// rows:     QilinSampleRow       [rows]                  how each row is sampled
// parts:    QilinSampleSplitPart [rows, splits]          scratch (unused when splits == 1)
// cands:    u32                  [rows, splits, QILIN_SAMPLE_SPLIT_CAP] scratch: candidates
// counters: u32                  [>= rows]               0 at launch, 0 again at exit
// logits:   bf16                 [rows, cols]
extern "C" __global__ void __launch_bounds__(QILIN_SAMPLE_THREADS, 1)
qilin_sample_split_bf16(const QilinSampleSplitParams p,
                        uint32_t* __restrict__ ids,
                        const QilinSampleRow* __restrict__ rows,
                        QilinSampleSplitPart* __restrict__ parts,
                        uint32_t* __restrict__ cands,
                        uint32_t* __restrict__ counters,
                        const bf16* __restrict__ logits) {
    QILIN_PDL_ENTRY();
    sample_split<false>(p, ids, rows, parts, cands, counters, logits);
}
