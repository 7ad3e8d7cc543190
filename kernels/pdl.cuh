// Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may
// start while the kernel before it on the stream is still running, so its launch, block
// placement and weight prefetch overlap that kernel's tail instead of following it.
//
// Why markers. The PTX is compute_80 (build.rs), and the instructions PDL needs
// (griddepcontrol, cp.async.bulk.prefetch) exist only from sm_90. So the helpers below
// emit PTX comments that carry their operands; on an sm_90+ device with QILIN_CUDA_PDL=1,
// src/backend/cuda/pdl.rs retargets the module to sm_90 and rewrites each marker into
// its instruction before the driver JIT-compiles it. Elsewhere the comments are inert
// and the kernels are the verified compute_80 ones (the `memory` clobber only keeps the
// compiler from hoisting a load above the entry, where there is nothing to hoist).
//
// The contract, checked on every entry's PTX by pdl.rs (and tests/pdl_ptx.rs):
//   - QILIN_PDL_ENTRY() is the kernel's first statement. Its wait (griddepcontrol.wait)
//     returns once the previous kernel has finished and its writes are visible; nothing
//     before it may read or write global memory, branch or take a label, so it
//     dominates every access. Launched without PDL, the wait returns at once.
//   - Its launch_dependents lets the next kernel's blocks be placed as soon as every
//     block of this one has passed its own wait: two kernels overlap, never three, and
//     the blocks of this one are all resident before the next one's take any room.
//   - Before the entry, only qilin_pdl_prefetch_l2 of data no kernel writes (weights):
//     the one access that may overlap the previous kernel.

#pragma once

#include <stdint.h>

// The first statement of every kernel (see above).
#define QILIN_PDL_ENTRY()                                          \
    do {                                                           \
        asm volatile("// qilin:pdl-wait" ::: "memory");            \
        asm volatile("// qilin:pdl-launch-dependents" ::: "memory"); \
    } while (0)

// Bytes of a block's weights it asks L2 for before its wait: what HBM delivers to one
// block's share in the few microseconds a decode step's short kernels last (H200: 4.2 TB/s
// x ~4 us / ~300 resident GEMV blocks ~ 56 KB), and small enough that the resident blocks
// of the widest layer (gate_up, ~900 blocks) ask for ~30 MB, under an H100's 50 MB L2.
#define QILIN_PDL_PREFETCH_BYTES 32768u

// Asks L2 for [p, p + min(bytes, QILIN_PDL_PREFETCH_BYTES)) (the 16-byte-aligned part of
// it), issued by one thread when `issue`; without a branch, so that it may stand before
// QILIN_PDL_ENTRY(). Only for data that no kernel of the step writes.
__device__ __forceinline__ void qilin_pdl_prefetch_l2(const void* p, size_t bytes, bool issue) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + 15u) & ~(uintptr_t)15u;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(uintptr_t)15u;
    const uintptr_t span = end > begin ? end - begin : 0u;
    const unsigned n =
        (unsigned)(span < QILIN_PDL_PREFETCH_BYTES ? span : QILIN_PDL_PREFETCH_BYTES);
    const unsigned go = issue && n != 0u ? 1u : 0u;
    asm volatile("// qilin:pdl-prefetch-l2 %0, %1, %2;" ::"l"(begin), "r"(n), "r"(go));
}

// qilin_pdl_prefetch_l2 of a block's rows [first, first + rows) of a row-major matrix of
// n_rows rows of row_bytes bytes each (rows past n_rows dropped), issued by thread 0: the
// GEMVs' weights, whose blocks each own a run of whole rows.
__device__ __forceinline__ void qilin_pdl_prefetch_rows(const void* base, unsigned first,
                                                        unsigned rows, unsigned n_rows,
                                                        size_t row_bytes) {
    const unsigned kept = min(rows, max(n_rows, first) - first);
    const char* rows0 = static_cast<const char*>(base) + (size_t)first * row_bytes;
    qilin_pdl_prefetch_l2(rows0, (size_t)kept * row_bytes, threadIdx.x == 0);
}
