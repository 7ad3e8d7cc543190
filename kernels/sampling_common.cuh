// Device sampling shared by kernels/sampling.cu (one block per row) and
// kernels/sampling_split.cu (several blocks per row): the row algorithm, its helpers and
// the searches both run, over a whole row or over a row's candidates.
//
// sample_row, as qilin_sample_bf16 runs it (CPU twin: CpuBackend::sample_rows = engine/sampler.rs sample_row, the
// host sampler's own filters and draw). Per row r, with its QilinSampleRow:
//   v(i) = f32(logits[r][i]), NaN -> -inf, +inf -> FLT_MAX; m = max v
//   inv_t == 0: ids[r] = argmax (as qilin_argmax_bf16). m == -inf: ids[r] = 0.
//   p(i) = exp_nonpos((v(i) - m) * inv_t)      bit-identical to vecmath::exp_nonpos: same
//          Cephes polynomial, every operation an explicit _rn intrinsic (no FMA contraction,
//          which Rust never does either), so p(best) = 1 and every p equals the host's.
//   K = {i : v(i) >= v_k}, v_k the k-th largest value (every tie of it kept); all if off.
//   Top-p over K, best first (larger v, then lower id): i survives when the mass of K
//          ranked strictly before it is < max(top_p, FLT_MIN) * mass(K); at least one.
//   Min-p: drop p(i) < min_p (p(best) = 1, so min_p is relative to the best token).
//   Draw: target = u * mass(survivors); the first survivor with p > 0, in TOKEN-ID ORDER,
//          whose cumulative mass exceeds target (the host walks the same order).
//
// Every logit is bf16, so the search runs over its 16-bit order-preserving key (sample_key;
// -0 keyed as +0 because the host compares values, and -0 == +0) instead of sorting:
//   pass 0      max key and its first index (argmax);
//   top-k       v_k by an 8-way search on the key: each pass counts key >= t at
//               SAMPLE_PROBES thresholds at once, <= 6 passes;
//   mass(K)     one pass;
//   top-p       the cut key v0 = the smallest key >= v_k with mass(key > v0) < target, by the
//               same 8-way search summing p over key > t (<= 6 passes; only elements above
//               the lowest threshold compute p), then one pass for A0 = mass(key > v0) and
//               the ties n0 = #(key == v0): the ties survive in id order while
//               A0 + j * p(v0) < target, i.e. the first c = ceil((target - A0) / p(v0)) of
//               them (all when p(v0) = 0: they weigh nothing);
//   chunks      one pass: per chunk of the row (<= SAMPLE_CHUNKS chunks of whole walk tiles,
//               one warp per chunk) the survivors' mass (min-p applied) and the ties of v0;
//               one thread then gives each chunk its kept ties (min(c, ...) in id order),
//               totals, and finds the chunk where target = u * total falls;
//   walk        through that chunk only, in tiles of QILIN_SAMPLE_THREADS *
//               QILIN_SAMPLE_WALK_ITEMS elements, each thread a run of consecutive ids held
//               in registers: a block scan of the ties (their rank decides the v0 ties), a
//               block scan of the survivors' mass, and the first id whose running sum (from
//               the chunks before) exceeds target. No crossing (rounding): the last
//               survivor of the last chunk with mass, as the host's fallback.
// Each pass re-reads the row, mostly from L2 (a 152,064-entry row is 304 KB; 64 rows fit an
// H100's 50 MB L2). One block per row is compute-bound on its SM for flat distributions
// (p for most of the row in each top-p pass): see bench `sample (...)` rows. Masses are f64
// (per thread, then fixed-order reductions), the host's too, so the two differ only by
// summation order (~1e-16), except where the host's dense path sums in f32 chunks (~1e-6
// relative): tests/gpu_sampling.rs accepts another token only where target lies within
// its tolerance of a survivor boundary or of the top-p cut.

#pragma once

#include "common.cuh"

static_assert(QILIN_SAMPLE_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_SAMPLE_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_SAMPLE_THREADS must be whole warps");

#define SAMPLE_WARPS (QILIN_SAMPLE_THREADS / QILIN_WARP_SIZE)
#define SAMPLE_TILE (QILIN_SAMPLE_THREADS * QILIN_SAMPLE_WALK_ITEMS)
// 16-byte loads each thread issues before using any (sample_scan_row).
#define SAMPLE_LOADS 4
// Thresholds each search pass tries at once: the range shrinks 8-fold per pass, so a
// 16-bit key takes at most 6 passes (bisection: 16).
#define SAMPLE_PROBES 7
// Most chunks the walk's per-chunk masses split a row into (a chunk is whole walk tiles):
// the walk then scans only the chunk where the draw lands.
#define SAMPLE_CHUNKS 64

// Order-preserving key of a bf16 bit pattern after the host's clean(): NaN counts as -inf,
// -0 as +0. Keys of real values run from 0x007f (-inf) to 0xff80 (+inf).
QILIN_DEVICE unsigned sample_key(unsigned bits) {
    if ((bits & 0x7fffu) > 0x7f80u) {
        bits = 0xff80u;  // NaN -> -inf
    }
    if (bits == 0x8000u) {
        bits = 0u;  // -0 -> +0
    }
    return (bits & 0x8000u) ? (~bits & 0xffffu) : (bits | 0x8000u);
}

// The cleaned value of a key: +inf becomes FLT_MAX, as the host's clean().
QILIN_DEVICE float sample_value(unsigned key) {
    const unsigned bits = (key & 0x8000u) ? (key & 0x7fffu) : (~key & 0xffffu);
    return fminf(__uint_as_float(bits << 16), 3.40282347e+38f);
}

// engine/sampler/vecmath.rs exp_nonpos, operation for operation (see the comment above).
QILIN_DEVICE float sample_exp_nonpos(float x) {
    const float LOG2E = 1.44269504f;
    const float LN2_HI = 0.6933594f;
    const float LN2_LO = -2.1219444e-4f;
    const float MAGIC = 12582912.0f;
    const float xc = fmaxf(x, -88.0f);
    const float t = __fadd_rn(__fmul_rn(xc, LOG2E), MAGIC);
    const float n = __fsub_rn(t, MAGIC);
    const float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float p = 1.9875691e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.6666665e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    const float e = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
    const int n_int = (int)__float_as_uint(t) - (int)__float_as_uint(MAGIC);
    const float pow2n = __uint_as_float((unsigned)max(n_int + 127, 0) << 23);
    return __fmul_rn(e, pow2n);
}

// p of a key: e^((v - m) * inv_t), exactly the host's term.
QILIN_DEVICE float sample_prob(unsigned key, float m, float inv_t) {
    return sample_exp_nonpos(__fmul_rn(__fsub_rn(sample_value(key), m), inv_t));
}

QILIN_DEVICE unsigned sample_load_key(const unsigned short* x, unsigned i) {
    return sample_key(__ldg(x + i));
}

// Calls f(key, index) for this thread's share of the row: 16-byte loads (eight keys) when
// the row is 16-byte aligned, the rest one by one. Which thread sees which element does
// not matter to the passes (they only count and sum).
template <typename F>
QILIN_DEVICE void sample_scan_row(const unsigned short* x, unsigned cols, F f) {
    unsigned done = 0;
    if ((reinterpret_cast<uintptr_t>(x) & 15u) == 0) {
        const unsigned vecs = cols / 8;
        const uint4* xv = reinterpret_cast<const uint4*>(x);
        // SAMPLE_LOADS loads in flight per thread: one block per row is latency-bound.
        for (unsigned v0 = threadIdx.x; v0 < vecs; v0 += SAMPLE_LOADS * QILIN_SAMPLE_THREADS) {
            uint4 w[SAMPLE_LOADS];
#pragma unroll
            for (int u = 0; u < SAMPLE_LOADS; ++u) {
                const unsigned v = v0 + u * QILIN_SAMPLE_THREADS;
                w[u] = v < vecs ? __ldg(xv + v) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < SAMPLE_LOADS; ++u) {
                const unsigned v = v0 + u * QILIN_SAMPLE_THREADS;
                if (v < vecs) {
                    const unsigned words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        f(sample_key(words[j] & 0xffffu), v * 8 + 2 * j);
                        f(sample_key(words[j] >> 16), v * 8 + 2 * j + 1);
                    }
                }
            }
        }
        done = vecs * 8;
    }
    for (unsigned i = done + threadIdx.x; i < cols; i += QILIN_SAMPLE_THREADS) {
        f(sample_load_key(x, i), i);
    }
}

// Block-wide sum; every thread gets it. Fixed order: deterministic.
template <typename T>
QILIN_DEVICE T sample_block_sum(T v, T* s) {
#pragma unroll
    for (int o = QILIN_WARP_SIZE / 2; o > 0; o /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    __syncthreads();  // s may still be read from the previous use
    if (threadIdx.x % QILIN_WARP_SIZE == 0) {
        s[threadIdx.x / QILIN_WARP_SIZE] = v;
    }
    __syncthreads();
    T total = 0;
    for (int w = 0; w < SAMPLE_WARPS; ++w) {
        total += s[w];
    }
    return total;
}

QILIN_DEVICE unsigned long long sample_block_max_u64(unsigned long long v,
                                                     unsigned long long* s) {
#pragma unroll
    for (int o = QILIN_WARP_SIZE / 2; o > 0; o /= 2) {
        const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    __syncthreads();
    if (threadIdx.x % QILIN_WARP_SIZE == 0) {
        s[threadIdx.x / QILIN_WARP_SIZE] = v;
    }
    __syncthreads();
    unsigned long long best = 0;
    for (int w = 0; w < SAMPLE_WARPS; ++w) {
        best = s[w] > best ? s[w] : best;
    }
    return best;
}

// Block-wide sums of SAMPLE_PROBES values at once, in place; s: [SAMPLE_PROBES][warps].
template <typename T>
QILIN_DEVICE void sample_block_sums(T (&v)[SAMPLE_PROBES], T* s) {
#pragma unroll
    for (int j = 0; j < SAMPLE_PROBES; ++j) {
#pragma unroll
        for (int o = QILIN_WARP_SIZE / 2; o > 0; o /= 2) {
            v[j] += __shfl_xor_sync(0xffffffffu, v[j], o);
        }
    }
    __syncthreads();
    if (threadIdx.x % QILIN_WARP_SIZE == 0) {
#pragma unroll
        for (int j = 0; j < SAMPLE_PROBES; ++j) {
            s[j * SAMPLE_WARPS + threadIdx.x / QILIN_WARP_SIZE] = v[j];
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < SAMPLE_PROBES; ++j) {
        T total = 0;
        for (int w = 0; w < SAMPLE_WARPS; ++w) {
            total += s[j * SAMPLE_WARPS + w];
        }
        v[j] = total;
    }
}

// Exclusive block scan (thread order); *total gets the block's sum.
template <typename T>
QILIN_DEVICE T sample_block_scan(T v, T* s, T* total) {
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    T inc = v;
#pragma unroll
    for (int o = 1; o < QILIN_WARP_SIZE; o *= 2) {
        const T w = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= (unsigned)o) {
            inc += w;
        }
    }
    __syncthreads();
    if (lane == QILIN_WARP_SIZE - 1) {
        s[threadIdx.x / QILIN_WARP_SIZE] = inc;
    }
    __syncthreads();
    T before = 0;
    T all = 0;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    for (unsigned w = 0; w < SAMPLE_WARPS; ++w) {
        before += w < warp ? s[w] : T(0);
        all += s[w];
    }
    *total = all;
    return before + inc - v;
}

// Top-k: the largest key kk with #(key >= kk) >= top_k among the keys `scan` visits
// (`scan(f)` calls f(key, index) for this thread's share; every thread calls it). Invariant:
// #(key >= lo) >= top_k and #(key > hi) < top_k; each pass counts at SAMPLE_PROBES keys
// between. s_pu: [SAMPLE_PROBES * SAMPLE_WARPS].
template <typename Scan>
QILIN_DEVICE unsigned sample_topk_key(Scan scan, unsigned top_k, unsigned max_key,
                                      unsigned* s_pu) {
    unsigned lo = 0, hi = max_key;
    while (lo < hi) {
        const unsigned step = (hi - lo) / (SAMPLE_PROBES + 1) + 1;
        unsigned t[SAMPLE_PROBES];
        unsigned c[SAMPLE_PROBES];
#pragma unroll
        for (int j = 0; j < SAMPLE_PROBES; ++j) {
            t[j] = min(lo + (j + 1) * step, hi + 1);
            c[j] = 0;
        }
        scan([&](unsigned k, unsigned) {
#pragma unroll
            for (int j = 0; j < SAMPLE_PROBES; ++j) {
                c[j] += k >= t[j];
            }
        });
        sample_block_sums(c, s_pu);
        unsigned new_lo = lo, new_hi = hi;
#pragma unroll
        for (int j = 0; j < SAMPLE_PROBES; ++j) {
            if (c[j] >= top_k) {
                new_lo = t[j];  // counts fall with t: the last such j wins
            } else {
                new_hi = min(new_hi, t[j] - 1);
            }
        }
        lo = new_lo;
        hi = new_hi;
    }
    return lo;
}

// Top-p: the cut key v0 >= kk, the smallest key with mass(key > v0) < target, and how many
// of its ties survive in id order (keep_ties; left as it is when p(v0) is 0: all of them,
// they weigh nothing), over the keys `scan` visits (as sample_topk_key). s_pd:
// [SAMPLE_PROBES * SAMPLE_WARPS]; s_d, s_u: [SAMPLE_WARPS].
template <typename Scan>
QILIN_DEVICE void sample_topp_cut(Scan scan, unsigned kk, unsigned max_key, double target,
                                  float m, float inv_t, double* s_pd, double* s_d, unsigned* s_u,
                                  unsigned& v0, unsigned& keep_ties) {
    // Invariant: mass(key > hi) < target, and mass(key > lo - 1) >= target unless lo
    // is kk; each pass sums at SAMPLE_PROBES keys between.
    unsigned lo = kk, hi = max_key;
    while (lo < hi) {
        const unsigned step = (hi - lo) / (SAMPLE_PROBES + 1) + 1;
        unsigned t[SAMPLE_PROBES];
        double a[SAMPLE_PROBES];
#pragma unroll
        for (int j = 0; j < SAMPLE_PROBES; ++j) {
            t[j] = min(lo + j * step, hi);
            a[j] = 0.0;
        }
        scan([&](unsigned k, unsigned) {
            if (k > t[0]) {  // most of the row is below every probe: no exp for it
                const double pk = (double)sample_prob(k, m, inv_t);
#pragma unroll
                for (int j = 0; j < SAMPLE_PROBES; ++j) {
                    a[j] += k > t[j] ? pk : 0.0;
                }
            }
        });
        sample_block_sums(a, s_pd);
        unsigned new_lo = lo, new_hi = hi;
#pragma unroll
        for (int j = SAMPLE_PROBES - 1; j >= 0; --j) {
            if (a[j] < target) {
                new_hi = min(new_hi, t[j]);  // masses grow as t falls: the first j wins
            } else {
                new_lo = max(new_lo, t[j] + 1);
            }
        }
        lo = new_lo;
        hi = new_hi;
    }
    v0 = lo;
    double above = 0.0;
    unsigned ties = 0;
    scan([&](unsigned k, unsigned) {
        above += k > v0 ? (double)sample_prob(k, m, inv_t) : 0.0;
        ties += k == v0;
    });
    above = sample_block_sum(above, s_d);
    ties = sample_block_sum(ties, s_u);
    // (v0 may be a key no token has, e.g. 0, whose "value" is meaningless: then no tie.)
    const double p0 = ties > 0 ? (double)sample_prob(v0, m, inv_t) : 0.0;
    if (p0 > 0.0) {
        // The host keeps tie j while A0 + j * p0 < target: j < (target - A0) / p0.
        const double c = ceil((target - above) / p0);
        keep_ties = c < 1.0 ? 1u : (c >= (double)ties ? ties : (unsigned)c);
    }
}

// Keys of a walk tile's items start .. start + 7 of a row (x), 0 at and past `end`.
QILIN_DEVICE void sample_load_walk_keys(const unsigned short* x, bool aligned, unsigned start,
                                        unsigned end, unsigned (&key)[QILIN_SAMPLE_WALK_ITEMS]) {
    static_assert(QILIN_SAMPLE_WALK_ITEMS == 8, "the walk loads its items as one uint4");
    if (aligned && start + QILIN_SAMPLE_WALK_ITEMS <= end) {
        const uint4 w = __ldg(reinterpret_cast<const uint4*>(x + start));
        const unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < QILIN_SAMPLE_WALK_ITEMS; ++j) {
            key[j] = sample_key(j % 2 == 0 ? words[j / 2] & 0xffffu : words[j / 2] >> 16);
        }
    } else {
#pragma unroll
        for (int j = 0; j < QILIN_SAMPLE_WALK_ITEMS; ++j) {
            key[j] = start + j < end ? sample_load_key(x, start + j) : 0u;
        }
    }
}

// The draw's walk over positions [begin, end) in order, in tiles of SAMPLE_TILE (thread t
// takes the tile's items 8t .. 8t + 7, which `load(start, key)` fills, 0 past end): a
// position survives when its key is above v0, or equals it and ranks below keep_ties
// among v0's ties in position order (tie_base of them came before begin), with p > 0
// and not below min_p; the first survivor whose running mass (from `base`) exceeds
// target is the draw, else (rounding) the last survivor. *id = id_of(that position).
// *s_found must be 0xffffffff, set before a barrier, when the block calls this.
template <typename Load, typename IdOf>
QILIN_DEVICE void sample_walk(Load load, IdOf id_of, unsigned begin, unsigned end, double base,
                              double target, unsigned v0, unsigned keep_ties, unsigned tie_base,
                              float m, float inv_t, float min_p, double* s_d, unsigned* s_u,
                              unsigned long long* s_l, unsigned* s_found, uint32_t* id) {
    const unsigned tid = threadIdx.x;
    unsigned last = 0;  // the last survivor with p > 0 seen: the answer if rounding runs out
    for (unsigned tile = begin; tile < end; tile += SAMPLE_TILE) {
        const unsigned start = tile + tid * QILIN_SAMPLE_WALK_ITEMS;
        unsigned key[QILIN_SAMPLE_WALK_ITEMS];
        load(start, key);
        unsigned my_ties = 0;
#pragma unroll
        for (int j = 0; j < QILIN_SAMPLE_WALK_ITEMS; ++j) {
            my_ties += start + j < end && key[j] == v0;
        }
        unsigned tile_ties;
        unsigned rank = tie_base + sample_block_scan(my_ties, s_u, &tile_ties);
        tie_base += tile_ties;
        unsigned kept = 0;  // bit j: element start + j survives with p > 0
        double my_mass = 0.0;
#pragma unroll
        for (int j = 0; j < QILIN_SAMPLE_WALK_ITEMS; ++j) {
            const bool in_chunk = start + j < end;
            bool keep = in_chunk && (key[j] > v0 || (key[j] == v0 && rank < keep_ties));
            rank += in_chunk && key[j] == v0;
            const float pk = keep ? sample_prob(key[j], m, inv_t) : 0.0f;
            keep = keep && pk > 0.0f && !(pk < min_p);
            kept |= (unsigned)keep << j;
            my_mass += keep ? (double)pk : 0.0;
        }
        double tile_mass;
        double acc = base + sample_block_scan(my_mass, s_d, &tile_mass);
        base += tile_mass;
        unsigned hit = 0xffffffffu;
#pragma unroll
        for (int j = 0; j < QILIN_SAMPLE_WALK_ITEMS; ++j) {
            if (kept & (1u << j)) {
                acc += (double)sample_prob(key[j], m, inv_t);
                last = max(last, start + j);
                if (acc > target && hit == 0xffffffffu) {
                    hit = start + j;
                }
            }
        }
        if (hit != 0xffffffffu) {
            atomicMin(s_found, hit);
        }
        __syncthreads();
        if (*s_found != 0xffffffffu) {
            break;
        }
    }
    // Rounding: nothing crossed; the last survivor.
    const unsigned found = *s_found;
    const unsigned long long lastc = sample_block_max_u64((unsigned long long)last, s_l);
    if (tid == 0) {
        *id = id_of(found != 0xffffffffu ? found : (unsigned)lastc);
    }
}

// One block samples one row of `cols` logits (bf16 bits at x) as rp says and writes the
// token to *id: the algorithm of the comment at the top of this file. Every thread of the
// block calls it (QILIN_SAMPLE_THREADS of them).
QILIN_DEVICE void sample_row(const QilinSampleRow rp, const unsigned short* x, unsigned cols,
                             uint32_t* id) {
    __shared__ double s_d[SAMPLE_WARPS];
    __shared__ unsigned s_u[SAMPLE_WARPS];
    __shared__ unsigned long long s_l[SAMPLE_WARPS];
    __shared__ unsigned s_found;
    __shared__ double s_pd[SAMPLE_PROBES * SAMPLE_WARPS];
    __shared__ double s_chunk_mass[SAMPLE_CHUNKS];
    __shared__ unsigned s_chunk_ties[SAMPLE_CHUNKS];
    __shared__ double s_walk_target;
    __shared__ double s_walk_base;
    __shared__ unsigned s_walk_chunk;
    __shared__ unsigned s_pu[SAMPLE_PROBES * SAMPLE_WARPS];
    const unsigned tid = threadIdx.x;
    const auto scan = [&](auto f) { sample_scan_row(x, cols, f); };

    // Pass 0: the largest key, first index: (key << 32) | ~index, the larger wins.
    unsigned long long best = 0;
    scan([&](unsigned k, unsigned i) {
        const unsigned long long c = ((unsigned long long)k << 32) | (unsigned long long)(~i);
        best = c > best ? c : best;
    });
    best = sample_block_max_u64(best, s_l);
    const unsigned max_key = (unsigned)(best >> 32);
    const unsigned argmax = cols == 0 ? 0u : ~(unsigned)best;
    const float m = sample_value(max_key);
    const float inv_t = rp.inv_t;
    if (!(inv_t > 0.0f) || cols == 0 || m == -INFINITY) {
        if (tid == 0) {
            *id = (inv_t > 0.0f && cols != 0) ? 0u : argmax;
        }
        return;
    }

    // Top-k (sample_topk_key).
    const unsigned kk = rp.top_k > 0 && rp.top_k < cols
                            ? sample_topk_key(scan, rp.top_k, max_key, s_pu)
                            : 0u;

    // Top-p: the cut key v0 and how many of its ties (in id order) survive.
    unsigned v0 = kk;
    unsigned keep_ties = 0xffffffffu;
    if (rp.top_p < 1.0f) {
        double mass_k = 0.0;
        scan([&](unsigned k, unsigned) {
            mass_k += k >= kk ? (double)sample_prob(k, m, inv_t) : 0.0;
        });
        const double top_p = (double)fmaxf(rp.top_p, 1.17549435e-38f);  // f32::MIN_POSITIVE
        const double target = top_p * sample_block_sum(mass_k, s_d);
        sample_topp_cut(scan, kk, max_key, target, m, inv_t, s_pd, s_d, s_u, v0, keep_ties);
    }

    // Min-p, then the survivors' mass per chunk (at most SAMPLE_CHUNKS chunks of whole walk
    // tiles), warp w summing chunks w, w + warps, ...: every survivor but the ties of v0,
    // which are counted instead (their rank in id order decides which of them survive).
    const float min_p = fminf(rp.min_p, 1.0f);
    const unsigned chunk_len =
        ceil_div(ceil_div(cols, (unsigned)SAMPLE_TILE), (unsigned)SAMPLE_CHUNKS) * SAMPLE_TILE;
    const unsigned chunks = ceil_div(cols, chunk_len);
    const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
    const unsigned lane = tid % QILIN_WARP_SIZE;
    for (unsigned c = tid / QILIN_WARP_SIZE; c < chunks; c += SAMPLE_WARPS) {
        const unsigned begin = c * chunk_len;
        const unsigned end = min(begin + chunk_len, cols);
        double mass = 0.0;
        unsigned ties = 0;
        auto add = [&](unsigned k) {
            if (k > v0) {
                const float pk = sample_prob(k, m, inv_t);
                mass += !(pk < min_p) ? (double)pk : 0.0;
            }
            ties += k == v0;
        };
        // chunk_len is a multiple of 8: a chunk of an aligned row starts aligned.
        const unsigned vec_end = aligned ? begin + (end - begin) / 8 * 8 : begin;
#pragma unroll 4
        for (unsigned i = begin + lane * 8; i < vec_end; i += QILIN_WARP_SIZE * 8) {
            const uint4 w = __ldg(reinterpret_cast<const uint4*>(x + i));
            const unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                add(sample_key(words[j] & 0xffffu));
                add(sample_key(words[j] >> 16));
            }
        }
        for (unsigned i = vec_end + lane; i < end; i += QILIN_WARP_SIZE) {
            add(sample_load_key(x, i));
        }
#pragma unroll
        for (int o = QILIN_WARP_SIZE / 2; o > 0; o /= 2) {
            mass += __shfl_xor_sync(0xffffffffu, mass, o);
            ties += __shfl_xor_sync(0xffffffffu, ties, o);
        }
        if (lane == 0) {
            s_chunk_mass[c] = mass;
            s_chunk_ties[c] = ties;
        }
    }
    __syncthreads();
    // One thread: the kept ties of each chunk, the total, and the chunk where the draw lands
    // (the last chunk with mass when rounding runs out: its last survivor is the answer).
    if (tid == 0) {
        unsigned ties_before = 0;
        double total = 0.0;
        for (unsigned c = 0; c < chunks; ++c) {
            const unsigned t = s_chunk_ties[c];
            const unsigned kept = keep_ties > ties_before ? min(t, keep_ties - ties_before) : 0u;
            s_chunk_ties[c] = ties_before;
            ties_before += t;
            if (kept > 0) {  // then v0 is a real key
                const float p_v0 = sample_prob(v0, m, inv_t);
                s_chunk_mass[c] += !(p_v0 < min_p) ? (double)kept * (double)p_v0 : 0.0;
            }
            total += s_chunk_mass[c];
        }
        const double target = rp.u * total;
        double acc = 0.0;
        unsigned chosen = 0;
        double chosen_base = 0.0;
        for (unsigned c = 0; c < chunks; ++c) {
            if (s_chunk_mass[c] > 0.0) {
                chosen = c;
                chosen_base = acc;
                acc += s_chunk_mass[c];
                if (acc > target) {
                    break;
                }
            }
        }
        s_walk_target = target;
        s_walk_base = chosen_base;
        s_walk_chunk = chosen;
        s_found = 0xffffffffu;
    }
    __syncthreads();
    const double target = s_walk_target;
    const unsigned chunk_begin = s_walk_chunk * chunk_len;
    const unsigned chunk_end = min(chunk_begin + chunk_len, cols);

    // The walk through that chunk, in token-id order.
    const auto load_row = [&](unsigned start, unsigned (&key)[QILIN_SAMPLE_WALK_ITEMS]) {
        sample_load_walk_keys(x, aligned, start, chunk_end, key);
    };
    sample_walk(load_row, [](unsigned i) { return i; }, chunk_begin, chunk_end, s_walk_base,
                target, v0, keep_ties, s_chunk_ties[s_walk_chunk], m, inv_t, min_p, s_d, s_u, s_l,
                &s_found, id);
}
