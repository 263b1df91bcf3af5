// FP8 MLA KV cache kernels: the quantizing write kv[loc[i]] = quantize([k_nope[i] | k_rope[i]]) and,
// at the end of this file, the dequantizing gather.
//
// The formats are specified (and implemented in plain torch) in mlakv/ops/fp8.py:
//   kFormat 0, per_tensor: row = e4m3([nope | rope] / k_scale)                   (nope + rope bytes)
//   kFormat 1, ds_mla:     row = [e4m3 nope in tiles of 128 | fp32 tile scales | bf16 rope], the
//                          tile scale by the rule kRule (mlakv.spec.rules.DS_MLA_SCALE_RULES):
//     kRule 0, fp32_floor: scale_t = max(amax_t / 448, FLT_MIN), amax over the tile's finite |x|,
//                          values x / scale_t;
//     kRule 1, fp32:       scale_t = amax_t / 448, amax over |x| (NaN ignored, inf kept), values
//                          x * (1 / scale_t) with a zero kept as itself;
//     kRule 2, ue8m0:      scale_t = 2^ceil(log2(max(amax_t / 448, 1e-4f))), amax as kRule 1,
//                          values x * (1 / scale_t) (exact: a power of two).
// kThreads (32, 64 or 128) threads per row, kThreads / 32 whole warps; or, per_tensor only, kThreads =
// the row's chunk count (nope + rope) / 8 when that is no multiple of 32 (72 for 512 + 64): "packed",
// one thread per chunk and the rows laid end to end over the CTA's threads, so no thread idles (with
// 128 threads per row, 56 of a 512 + 64 row's threads hold no chunk yet run the kernel's setup: on the
// H200 at 1024 rows the JIT write issued 367 warp instructions per row, 5.6x the plain write's;
// packed, 220). Thread t holds the row's 16-byte source chunks c = t + kThreads*i (8 values each; the
// nope chunks first, then the rope's):
// with 32 a lane carries 2-3 chunks in one dependent chain of load, widen, amax, shuffle, divide,
// convert and store, which bounds a call of few rows by its latency; 64 and 128 spread the row over
// more threads (one chunk each for 512 + 64). In ds_mla a tile of 128 values is 16 consecutive
// chunks = 16 threads of one i, one half-warp (kThreads is a multiple of 16), so its amax is a
// 4-step __shfl_xor_sync butterfly inside each half-warp. Values are divided by the scale with IEEE
// division (div_fast: the result of __fdiv_rn without its per-value branch; per_tensor with a
// power-of-two scale: the product by its exact reciprocal, quant8_e4m3) and converted with
// cvt.rn.satfinite.e4m3x2.f32 (RNE, saturating to +-448);
// NaN is then written as the canonical 0x7F. The 8 bytes of a chunk go out as one 8-byte store, a
// tile's scale as one 4-byte store, the rope as 16-byte stores: the whole row (656 bytes for
// 512 + 64) is written by the warp in one pass.
// Rules 1 and 2 need no division per value: the reciprocal is __frcp_rn (IEEE) once per tile, each
// value one __fmul_rn.
// Padding rows (loc < 0), slot == skip_slot (the pool's reserved slot) and slots >= num_slots are
// not written. loc is read at its stride.
// Offsets are 64-bit. With kUsePDL the kernel waits on the previous grid (griddepcontrol.wait)
// before reading inputs and lets the next one launch at entry or right after that wait, as the
// FP8 family's launch row says for the call's n_loc (fp8_jit_launch in mlakv/spec/tuning.py), which
// also sets the threads per row and the warps per CTA (rows per CTA = 32 * warps / threads per row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstdint>
#include <string>

#include "row_args.cuh"

namespace mlakv {
namespace fp8 {

constexpr float kE4M3Max = 448.0f;
constexpr float kFltMin = 1.17549435e-38f;
constexpr float kUe8m0Floor = 1e-4f;  // 0x38D1B717

// ds_mla's tile-scale rules: the codes of mlakv.spec.rules.DS_MLA_SCALE_RULES.
constexpr int kRuleFp32Floor = 0;
constexpr int kRuleFp32 = 1;
constexpr int kRuleUe8m0 = 2;

// Two fp32 -> two e4m3 bytes (lo in the low byte): RNE, saturating, NaN -> 0x7F.
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  uint32_t out = r;
  if (lo != lo) out = (out & 0xff00u) | 0x7fu;
  if (hi != hi) out = (out & 0x00ffu) | 0x7f00u;
  return out;
}

// IEEE round-to-nearest division x / s (the result of __fdiv_rn, bit for bit) without its
// per-division branch. __fdiv_rn is a refined-reciprocal FMA sequence, a range check and a branch
// to a slow path; inlined sixteen times per lane it put sixteen branches, calls and convergence
// barriers in a row (~1300 instructions per kernel; removing them saved 0.2-0.4 us per call at
// 1-1024 rows on the H100, docs/benchmarks.md). Here the reciprocal is refined once per divisor and
// each quotient takes the same FMA sequence with no branch; one test per 8 values sends a chunk to
// __fdiv_rn (out of line) when an operand leaves the range where that sequence is exact
// (div_fast_exact): x zero or normal with its exponent >= 27 and within 100 of the divisor's (so
// neither the quotient nor the remainders come near underflow or overflow), the divisor positive
// and normal. tests/test_fp8.py compares div1 with the fp64-rounded quotient on the GPU over every
// exponent pair and every divisor mantissa.
struct Divisor {
  float s;        // the divisor
  float r;        // 1/s: the hardware reciprocal, refined by one Newton step
  uint32_t lo;    // fast path: |x|'s bits in [lo, lo + span), or x == 0
  uint32_t span;  // 0 when s is not positive and normal (no fast path)
  uint32_t hi;    // e4m3 results: |x|'s bits below hi suffice (div_fast_ok_e4m3); 0 when s < 2^-80
  float p;        // 1/s exactly where s is a power of two in [2^-126, 2^125] (x * p is then x / s
                  // itself, rounded once, subnormal or not); 0 otherwise
};

// Divisor::p of s: 2^(127 - (e - 127)) for s = 2^(e - 127), e in [1, 252] (the reciprocal normal too).
__device__ __forceinline__ float exact_reciprocal(float s) {
  const uint32_t b = __float_as_uint(s);
  const uint32_t e = b >> 23;  // includes the sign bit: a negative s gives e >= 256
  return ((b & 0x7fffffu) == 0 && e >= 1 && e <= 252) ? __uint_as_float((254u - e) << 23) : 0.0f;
}

__device__ __forceinline__ Divisor make_divisor(float s) {
  const uint32_t e = __float_as_uint(s) >> 23;  // includes the sign bit: a negative s gives e >= 256
  float r0;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(s));
  const uint32_t lo_e = e > 127 ? e - 100 : 27u;          // max(27, e - 100), for e in [2, 252]
  const uint32_t hi_e = e + 101 < 255 ? e + 101 : 255u;  // min(255, e + 101): inf/NaN excluded
  const bool ok = e >= 2 && e <= 252;
  // For an e4m3 result, values below the exact range are harmless once s >= 2^-80 (e >= 47): their
  // quotients are < 2^-20 and become e4m3 +-0 whatever their last bits (the smallest e4m3 magnitude
  // is 2^-9), so only the upper end needs a test; hi = 0 (no fast path) below that.
  return {s, fmaf(r0, fmaf(-s, r0, 1.0f), r0), lo_e << 23, ok ? (hi_e - lo_e) << 23 : 0u,
          (ok && e >= 47) ? hi_e << 23 : 0u, exact_reciprocal(s)};
}

// On |x|, the sign put back after: the FMA steps would turn -0 into +0 (round-to-nearest is
// symmetric, so this changes nothing else).
__device__ __forceinline__ float div_fast(float x, const Divisor& d) {
  const float a = fabsf(x);
  const float q0 = __fmul_rn(a, d.r);
  const float q1 = fmaf(d.r, fmaf(-d.s, q0, a), q0);
  return copysignf(fmaf(d.r, fmaf(-d.s, q1, a), q1), x);
}

// Whether x lies where div_fast(x, d) equals __fdiv_rn(x, d.s).
__device__ __forceinline__ bool div_fast_exact(float x, const Divisor& d) {
  const uint32_t a = __float_as_uint(x) & 0x7fffffffu;
  return d.span != 0 && ((a == 0) | (a - d.lo < d.span));
}

// Whether the e4m3 bytes of f[0..7] / d.s are the same through div_fast as through __fdiv_rn: the
// largest |x| (as bits) below d.hi: two instructions per value.
__device__ __forceinline__ bool div_fast_ok_e4m3(const float f[8], const Divisor& d) {
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) m = max(m, __float_as_uint(f[j]) & 0x7fffffffu);
  return m < d.hi;
}

// 8 values / s -> 8 e4m3 bytes through __fdiv_rn and the NaN rule, out of line: the kernel holds
// one copy (inlined, each division brought its own branch, call and convergence barrier).
struct F8 {
  float v[8];
};

__device__ __forceinline__ uint2 pack_e4m3x8(const uint32_t b[4]) {
  return make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
}

__device__ __noinline__ uint2 quant8_ieee(F8 x, float s) {
  uint32_t b[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = e4m3x2(__fdiv_rn(x.v[2 * j], s), __fdiv_rn(x.v[2 * j + 1], s));
  return pack_e4m3x8(b);
}

__device__ __noinline__ float div1_ieee(float x, float s) { return __fdiv_rn(x, s); }

// x / d.s, the IEEE round-to-nearest quotient.
__device__ __forceinline__ float div1(float x, const Divisor& d) {
  return div_fast_exact(x, d) ? div_fast(x, d) : div1_ieee(x, d.s);
}

// 8 values / d.s -> 8 e4m3 bytes, RNE, saturating, NaN -> 0x7F. `fast`: the caller has shown that
// div_fast gives the same bytes for these values (div_fast_ok_e4m3, or the ds_mla tile rule); both
// rules refuse inf and NaN, so the fast path's quotients are finite and need no NaN fix-up.
__device__ __forceinline__ uint2 quant8(const float f[8], const Divisor& d, bool fast) {
  if (__builtin_expect(fast, 1)) {
    uint32_t b[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint16_t r;
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;"
          : "=h"(r)
          : "f"(div_fast(f[2 * j + 1], d)), "f"(div_fast(f[2 * j], d)));
      b[j] = r;
    }
    return pack_e4m3x8(b);
  }
  F8 x;
#pragma unroll
  for (int j = 0; j < 8; ++j) x.v[j] = f[j];
  return quant8_ieee(x, d.s);
}

// 8 values / d.s -> 8 e4m3 bytes (RNE, saturating, NaN -> 0x7F), the per_tensor rule. A power-of-two
// scale (the k_scale of 1 an engine passes without calibration) has an exact reciprocal d.p, and x * p
// is the quotient itself: one product per value, no range test. A NaN's byte (0xFF for a negative
// one) becomes 0x7F: in each 32-bit word, a byte 0xFF has its low 7 bits + 1 carry into bit 7 and
// its own bit 7 set, and loses that bit. Any other scale takes quant8.
__device__ __forceinline__ uint2 quant8_e4m3(const float f[8], const Divisor& d) {
  if (d.p != 0.0f) {
    uint32_t w[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      uint16_t a, b;
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(a) : "f"(__fmul_rn(f[4 * k + 1], d.p)), "f"(__fmul_rn(f[4 * k], d.p)));
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(b) : "f"(__fmul_rn(f[4 * k + 3], d.p)), "f"(__fmul_rn(f[4 * k + 2], d.p)));
      const uint32_t v = static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
      w[k] = v ^ (((v & 0x7f7f7f7fu) + 0x01010101u) & v & 0x80808080u);
    }
    return make_uint2(w[0], w[1]);
  }
  return quant8(f, d, div_fast_ok_e4m3(f, d));
}

// ---- ds_mla's tile-scale rules, shared with the fused RoPE write (rope_write.cuh) ------------------
// A lane's part of a tile's amax over its 8 values f[0..7]: kRuleFp32Floor takes the finite |x| only
// (`fast` turns false on a chunk holding inf or NaN: quant8 divides it with __fdiv_rn); the others
// are an fmaxf reduction (a NaN is ignored, an inf kept).
template <int kRule>
__device__ __forceinline__ float chunk_amax(const float f[8], float amax, bool& fast) {
  if constexpr (kRule == kRuleFp32Floor) {
    // One max per value that keeps a NaN (max.NaN): below inf, the chunk is finite and m is its
    // amax; else (rare) the finite values' max, and the chunk leaves the fast path.
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(m), "f"(fabsf(f[j])));
    if (__builtin_expect(m < INFINITY, 1)) return fmaxf(amax, m);
    fast = false;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float x = fabsf(f[j]);
      if (x < INFINITY) amax = fmaxf(amax, x);  // NaN and inf do not set the scale
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(f[j]));
  }
  return amax;
}

// The tile's scale from its amax, as a Divisor: kRuleFp32Floor's for quant8 (the IEEE division
// scheme above); for the other rules .s is the scale and .r its IEEE reciprocal (__frcp_rn: inf for
// a zero or tiny scale, 0 for an infinite one), what quant8_tile multiplies by.
template <int kRule>
__device__ __forceinline__ Divisor tile_divisor(float amax, const Divisor& e4m3_max) {
  const float q = div1(amax, e4m3_max);  // __fdiv_rn(amax, 448)
  if constexpr (kRule == kRuleFp32Floor) {
    return make_divisor(fmaxf(q, kFltMin));
  } else {
    float s = q;
    if constexpr (kRule == kRuleUe8m0) {
      uint32_t b = __float_as_uint(fmaxf(q, kUe8m0Floor));
      b = (b & 0x7f800000u) + ((b & 0x7fffffu) ? 0x800000u : 0u);  // up to a power of two (+inf stays)
      s = __uint_as_float(b);
    }
    return {s, __frcp_rn(s), 0u, 0u, 0u, 0.0f};
  }
}

// 8 values of a tile -> 8 e4m3 bytes by the rule: kRuleFp32Floor through quant8 (`fast` as there, and
// false for a scale below 2^-88); the others x * d.r with a zero kept as itself, then the
// conversion (RNE, saturating, NaN -> 0x7F).
template <int kRule>
__device__ __forceinline__ uint2 quant8_tile(const float f[8], const Divisor& d, bool fast) {
  if constexpr (kRule == kRuleFp32Floor) {
    return quant8(f, d, fast && (__float_as_uint(d.s) >> 23) >= 39u);
  } else {
    float y[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) y[j] = f[j] == 0.0f ? f[j] : __fmul_rn(f[j], d.r);
    uint32_t b[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = e4m3x2(y[2 * j], y[2 * j + 1]);
    return pack_e4m3x8(b);
  }
}

// fp32 -> bf16 bits, RNE, NaN -> 0x7FC0 (the ds_mla rope of an fp16 source).
__device__ __forceinline__ uint32_t bf16_bits(float x) {
  if (x != x) return 0x7fc0u;
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
}

// 16-byte chunk c of a row's sources (nope chunks first, then rope), plain loads.
template <int kNC>
__device__ __forceinline__ uint4 load_chunk(const uint8_t* nsrc, const uint8_t* rsrc, int c) {
  return c < kNC ? reinterpret_cast<const uint4*>(nsrc)[c] : reinterpret_cast<const uint4*>(rsrc)[c - kNC];
}

// The launch order of one row, as the plain row write (set_mla_kv_row_kernel) measured best on the
// H100: the PDL trigger at entry (kEarlyTrigger) or right after the wait, never behind a use of a
// loaded value; addresses formed before the wait; loc, sources and the scale loaded together right
// behind it (no load waits on a test of loc); only the stores test loc.
// a: the row block of row_args.cuh (dcp_world 1); k_scale: per_tensor's scale (1 element on the
// device; ds_mla does not read it).
template <int kFormat, int kRule, int kNope, int kRope, bool kBf16, bool kUsePDL, bool kEarlyTrigger, int kThreads,
          typename LocT>
__global__ void quant_write_kernel(const __grid_constant__ RowArgs a, const float* __restrict__ k_scale) {
  static_assert(kNope % 8 == 0 && kRope % 8 == 0, "widths must be multiples of 8 values");
  constexpr int kNC = kNope / 8;  // 16-byte source chunks of nope
  constexpr int kRC = kRope / 8;
  constexpr bool kPacked = kThreads % 32 != 0;
  static_assert(kThreads == 32 || kThreads == 64 || kThreads == 128 || (kFormat == 0 && kThreads == kNC + kRC),
                "32, 64 or 128 threads per row, or per_tensor's one thread per chunk");
  // Aligned: blockDim = (kThreads, rows per CTA), a row's threads are whole warps, so the tests of
  // the row below are uniform per warp (ds_mla's shuffles rely on it). Packed: blockDim = (threads
  // per CTA, 1) and thread g of the grid holds chunk g % kThreads of row g / kThreads (the launcher
  // keeps g within 32 bits); a warp may span two or three rows, which per_tensor (no shuffles) allows.
  int t;
  int64_t item;
  if constexpr (kPacked) {
    const uint32_t g = blockIdx.x * blockDim.x + threadIdx.x;
    const uint32_t row = g / static_cast<uint32_t>(kThreads);
    t = static_cast<int>(g - row * static_cast<uint32_t>(kThreads));
    item = row;
  } else {
    t = threadIdx.x;
    item = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  }

  if constexpr (kUsePDL && kEarlyTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (item >= a.n_loc) return;  // aligned: uniform per row, the shuffles below see all 32 lanes of each warp
  const uint8_t* nsrc = a.nope + item * a.nope_stride;
  const uint8_t* rsrc = a.rope + item * a.rope_stride;
  const LocT* lp = static_cast<const LocT*>(a.loc) + item * a.loc_stride;
  if constexpr (kUsePDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if constexpr (kUsePDL && !kEarlyTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int64_t raw = static_cast<int64_t>(*lp);

  if constexpr (kFormat == 0) {
    constexpr int kC = kNC + kRC;  // a row's chunks: nope first, then rope
    constexpr int kIters = (kC + kThreads - 1) / kThreads;
    uint4 v[kIters];
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = t + kThreads * i;
      if (c < kC) v[i] = load_chunk<kNC>(nsrc, rsrc, c);
    }
    const Divisor scale = make_divisor(*k_scale);
    // One chunk per thread (128 threads per row, or packed): the chunk is quantized before loc's test. Written
    // after it, nvcc 13 sank the scale's load below the test into the store path, a second memory round
    // trip (H200, one row: 0.90 us, 0.70 with this). With more chunks per thread the quantizing stays
    // behind the test, where it measured faster (H200, 64 threads: 0.85 against 0.97 us at 8 rows;
    // nvcc keeps the scale's load with loc's there).
    uint2 q[kIters];
    if constexpr (kIters == 1) {
      if (t < kC) {
        float f[8];
        widen8<kBf16>(v[0], f);
        q[0] = quant8_e4m3(f, scale);
      }
    }
    if (raw < 0 || raw == a.skip_index || raw >= a.num_slots) return;
    uint8_t* dst = a.kv + raw * a.kv_stride;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = t + kThreads * i;
      if (c < kC) {
        if constexpr (kIters > 1) {
          float f[8];
          widen8<kBf16>(v[i], f);
          q[i] = quant8_e4m3(f, scale);
        }
        reinterpret_cast<uint2*>(dst)[c] = q[i];
      }
    }
  } else {
    static_assert(kNope % 128 == 0, "ds_mla tiles are 128 values");
    constexpr int kTiles = kNope / 128;
    constexpr int kScaleOff = kNope;
    constexpr int kRopeOff = kNope + 4 * kTiles;
    static_assert(kRopeOff % 16 == 0, "the rope of a ds_mla row must start on 16 bytes");
    constexpr int kNI = (kNC + kThreads - 1) / kThreads;
    constexpr int kRI = (kRC + kThreads - 1) / kThreads;
    // The rope chunks continue the row's chunk sequence: rope chunk r is the row's chunk kNC + r, held
    // by thread (kNC + r) % kThreads (with 128 threads per row the threads past the nope's 64). With
    // 32 threads per row this is the one-warp kernel as it was, instruction for instruction.
    const int rt = kNC % kThreads == 0 ? t : (t + kThreads - kNC % kThreads) % kThreads;
    uint4 v[kNI];
    uint4 r[kRI];
#pragma unroll
    for (int i = 0; i < kNI; ++i) {
      const int c = t + kThreads * i;
      if (c < kNC) v[i] = reinterpret_cast<const uint4*>(nsrc)[c];
    }
#pragma unroll
    for (int i = 0; i < kRI; ++i) {
      const int c = rt + kThreads * i;
      if (c < kRC) r[i] = reinterpret_cast<const uint4*>(rsrc)[c];
    }
    // Tile amax and scale: every thread takes part in the shuffles, whatever loc says and whether or
    // not it holds a nope chunk at this i (none: amax 0, which changes no tile's max; with 128
    // threads per row the threads past the nope's 64 shuffle zeros). A tile is 16 consecutive chunks;
    // kThreads is a multiple of 16, so the 16 chunks of a tile at one i lie in the 16 threads of one
    // half-warp and the 4-step xor butterfly (offsets 8..1, full mask, every lane) reduces exactly
    // those. kRuleFp32Floor: the division by a tile's scale needs no per-value range test: |x| <=
    // amax = 448 * scale for finite x, so with scale >= 2^-88 (biased exponent >= 39) a quotient >=
    // 2^-12 has x >= 2^-100 in div_fast's exact range, and a smaller one is e4m3 +-0 however its
    // last bits fall (the smallest e4m3 magnitude is 2^-9). A chunk holding inf or NaN, or a tile
    // with a smaller scale, divides with __fdiv_rn (quant8_tile).
    static_assert(kNC % 16 == 0 && kThreads % 16 == 0, "a tile's chunks must share a half-warp");
    const Divisor e4m3_max = make_divisor(kE4M3Max);
    float f[kNI][8];
    Divisor scale[kNI];
    bool fast[kNI];
#pragma unroll
    for (int i = 0; i < kNI; ++i) {
      const int c = t + kThreads * i;
      float amax = 0.0f;
      fast[i] = true;
      if (c < kNC) {
        widen8<kBf16>(v[i], f[i]);
        amax = chunk_amax<kRule>(f[i], amax, fast[i]);
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      scale[i] = tile_divisor<kRule>(amax, e4m3_max);
    }
    if (raw < 0 || raw == a.skip_index || raw >= a.num_slots) return;
    uint8_t* dst = a.kv + raw * a.kv_stride;
#pragma unroll
    for (int i = 0; i < kNI; ++i) {
      const int c = t + kThreads * i;
      if (c < kNC) {
        reinterpret_cast<uint2*>(dst)[c] = quant8_tile<kRule>(f[i], scale[i], fast[i]);
        if ((c & 15) == 0) *reinterpret_cast<float*>(dst + kScaleOff + 4 * (c >> 4)) = scale[i].s;
      }
    }
#pragma unroll
    for (int i = 0; i < kRI; ++i) {
      const int c = rt + kThreads * i;
      if (c < kRC) {
        uint4 out = r[i];
        if constexpr (!kBf16) {
          float h[8];
          widen8<false>(r[i], h);
          out.x = bf16_bits(h[0]) | (bf16_bits(h[1]) << 16);
          out.y = bf16_bits(h[2]) | (bf16_bits(h[3]) << 16);
          out.z = bf16_bits(h[4]) | (bf16_bits(h[5]) << 16);
          out.w = bf16_bits(h[6]) | (bf16_bits(h[7]) << 16);
        }
        reinterpret_cast<uint4*>(dst + kRopeOff)[c] = out;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host launcher. Python (mlakv/ops/fp8.py) has validated the call; this re-checks every fact
// the kernel's memory safety rests on and raises a Python exception, never faults. Returns false,
// launching nothing, when the addresses or row strides do not suit the kernel's vectors
// (sources 16 bytes, kv 16 bytes): the caller falls back to Triton. A call with no rows returns true
// (after the checks; nothing is launched) whatever the alignment.
// ---------------------------------------------------------------------------------------------
template <int kFormat, int kRule, int kNope, int kRope, bool kUsePDL, bool kBf16, int kThreads, typename LocT>
void launch_quant_typed(const RowArgs& a, const float* k_scale, int num_warps, bool early_trigger,
                        cudaStream_t stream) {
  const int cta = num_warps * 32;
  int64_t blocks;
  dim3 block;
  if constexpr (kThreads % 32 != 0) {  // packed: thread g holds chunk g % kThreads of row g / kThreads
    TVM_FFI_CHECK(a.n_loc <= (int64_t{0x7fffffff} - cta) / kThreads, ValueError)
        << "n_loc=" << a.n_loc << " is too many rows for threads_per_row=" << kThreads
        << " (one thread per chunk); use 32, 64 or 128";
    blocks = (a.n_loc * kThreads + cta - 1) / cta;
    block = dim3(static_cast<unsigned>(cta), 1);
  } else {
    const int rows = cta / kThreads;  // rows per CTA (the caller checked the division is exact)
    blocks = (a.n_loc + rows - 1) / rows;
    block = dim3(kThreads, static_cast<unsigned>(rows));
  }
  TVM_FFI_CHECK(blocks <= 0x7fffffff, ValueError) << "n_loc=" << a.n_loc << " needs too many blocks";
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config(dim3(static_cast<unsigned>(blocks)), block, 0, stream, kUsePDL, attr);
  TVM_FFI_CHECK_CUDA_ERROR(
      early_trigger
          ? cudaLaunchKernelEx(&cfg,
                               quant_write_kernel<kFormat, kRule, kNope, kRope, kBf16, kUsePDL, true, kThreads, LocT>,
                               a, k_scale)
          : cudaLaunchKernelEx(&cfg,
                               quant_write_kernel<kFormat, kRule, kNope, kRope, kBf16, kUsePDL, false, kThreads, LocT>,
                               a, k_scale));
}

// The packed threads per row of a format and widths: per_tensor's chunk count (nope + rope) / 8 where
// that is no multiple of 32 (a multiple of 32 is an aligned shape already), else 0 (none).
constexpr int packed_threads(int format, int nope, int rope) {
  return format == 0 && ((nope + rope) / 8) % 32 != 0 ? (nope + rope) / 8 : 0;
}

// One rule's kernel for the threads per row (32, 64, 128 or the packed count).
template <int kFormat, int kRule, int kNope, int kRope, bool kUsePDL, bool kBf16, typename LocT>
void launch_quant_threads(const RowArgs& a, const float* k_scale, int num_warps, bool early_trigger,
                          int threads_per_row, cudaStream_t stream) {
  constexpr int kPacked = packed_threads(kFormat, kNope, kRope);
  if constexpr (kPacked != 0) {
    if (threads_per_row == kPacked) {
      launch_quant_typed<kFormat, kRule, kNope, kRope, kUsePDL, kBf16, kPacked, LocT>(a, k_scale, num_warps,
                                                                                        early_trigger, stream);
      return;
    }
  }
#define MLAKV_FP8_LAUNCH(T) \
  launch_quant_typed<kFormat, kRule, kNope, kRope, kUsePDL, kBf16, T, LocT>(a, k_scale, num_warps, early_trigger, stream)
  if (threads_per_row == 32) {
    MLAKV_FP8_LAUNCH(32);
  } else if (threads_per_row == 64) {
    MLAKV_FP8_LAUNCH(64);
  } else {
    MLAKV_FP8_LAUNCH(128);
  }
#undef MLAKV_FP8_LAUNCH
}

// One rule's kernels for the sources' dtype, loc's width and the threads per row.
template <int kFormat, int kRule, int kNope, int kRope, bool kUsePDL>
void launch_quant_rule(const RowArgs& a, const float* k_scale, bool is_bf16, bool loc32, int num_warps,
                       bool early_trigger, int threads_per_row, cudaStream_t stream) {
#define MLAKV_FP8_LAUNCH_T(BF16, LOCT)                                                                    \
  launch_quant_threads<kFormat, kRule, kNope, kRope, kUsePDL, BF16, LOCT>(a, k_scale, num_warps, early_trigger, \
                                                                          threads_per_row, stream)
  if (is_bf16) {
    if (loc32) {
      MLAKV_FP8_LAUNCH_T(true, int32_t);
    } else {
      MLAKV_FP8_LAUNCH_T(true, int64_t);
    }
  } else {
    if (loc32) {
      MLAKV_FP8_LAUNCH_T(false, int32_t);
    } else {
      MLAKV_FP8_LAUNCH_T(false, int64_t);
    }
  }
#undef MLAKV_FP8_LAUNCH_T
}

// The launch shape's rule, for both launchers: threads per row 32, 64 or 128, or `packed` where it
// is not 0 (the quantizing per_tensor write's one thread per chunk); num_warps (the CTA's warps) in
// [1, 32] and, for 32, 64 or 128, a whole number of rows (32 * num_warps a multiple of threads_per_row).
inline void check_launch_shape(int64_t num_warps, int64_t threads_per_row, int packed = 0) {
  TVM_FFI_CHECK(num_warps >= 1 && num_warps <= 32, ValueError) << "num_warps must be in [1, 32], got " << num_warps;
  if (packed != 0 && threads_per_row == packed) return;
  TVM_FFI_CHECK(threads_per_row == 32 || threads_per_row == 64 || threads_per_row == 128, ValueError)
      << "threads_per_row must be 32, 64 or 128"
      << (packed != 0 ? ", or " + std::to_string(packed) + " (one thread per 16-byte chunk)" : std::string())
      << ", got " << threads_per_row;
  TVM_FFI_CHECK((32 * num_warps) % threads_per_row == 0, ValueError)
      << "num_warps=" << num_warps << " (" << 32 * num_warps << " threads) is not a whole number of rows of "
      << "threads_per_row=" << threads_per_row;
}

// kv: [num_slots, (1,) >= row_bytes] 8-bit; loc: [n_loc] int32/int64 (any stride);
// nope: [n_loc, (1,) kNope], rope: [n_loc, (1,) kRope], both bf16 or both fp16;
// scale: per_tensor: 1-element fp32 on the device (ds_mla: not read); rows whose slot is skip_slot
// are skipped like padding (-1: none); num_warps: the CTA's warps, in [1, 32]; early_trigger: the PDL
// trigger at kernel entry (else right after the wait); scale_rule: ds_mla's tile-scale rule code (0
// fp32_floor, 1 fp32, 2 ue8m0; per_tensor takes any of them and ignores it); threads_per_row: 32,
// 64 or 128, with 32 * num_warps a multiple of it (rows per CTA = 32 * num_warps / threads_per_row),
// or per_tensor's packed count (packed_threads: 72 for 512 + 64) with any num_warps.
template <int kFormat, int kNope, int kRope, bool kUsePDL>
bool launch_mla_fp8_quant(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView nope,
                          tvm::ffi::TensorView rope, tvm::ffi::TensorView scale, int64_t skip_slot,
                          int64_t num_warps, bool early_trigger, int64_t scale_rule, int64_t threads_per_row) {
  constexpr int64_t kRowBytes = kFormat == 0 ? kNope + kRope : kNope + 4 * (kNope / 128) + 2 * kRope;
  const auto rows_ok = [](const tvm::ffi::TensorView& t) {
    return t.ndim() == 2 || (t.ndim() == 3 && t.size(1) == 1);
  };
  TVM_FFI_CHECK(loc.ndim() == 1, ValueError) << "loc must be 1-D [n_loc], got " << loc.ndim() << "-D";
  TVM_FFI_CHECK(rows_ok(kv) && rows_ok(nope) && rows_ok(rope), ValueError)
      << "kv_buffer/k_nope/k_rope must be 2-D [n, d] or 3-D [n, 1, d]";
  const DLDevice dev = kv.device();
  const auto on_dev = [&dev](const tvm::ffi::TensorView& t) {
    return t.device().device_type == dev.device_type && t.device().device_id == dev.device_id;
  };
  TVM_FFI_CHECK(dev.device_type == kDLCUDA && on_dev(loc) && on_dev(nope) && on_dev(rope) && on_dev(scale),
                ValueError)
      << "kv_buffer, loc, k_nope, k_rope and k_scale must be on one CUDA device";
  TVM_FFI_CHECK(loc.dtype().code == kDLInt && (loc.dtype().bits == 32 || loc.dtype().bits == 64), TypeError)
      << "loc must be int32 or int64";
  const int64_t n_loc = loc.size(0);
  TVM_FFI_CHECK(nope.size(0) == n_loc && rope.size(0) == n_loc, ValueError)
      << "k_nope/k_rope: dim 0 must equal n_loc=" << n_loc;
  const DLDataType sd = nope.dtype();
  const bool is_bf16 = sd.code == kDLBfloat && sd.bits == 16 && sd.lanes == 1;
  const bool is_f16 = sd.code == kDLFloat && sd.bits == 16 && sd.lanes == 1;
  TVM_FFI_CHECK((is_bf16 || is_f16) && rope.dtype() == sd, TypeError)
      << "k_nope and k_rope must both be bfloat16 or both float16";
  TVM_FFI_CHECK(kv.dtype().bits == 8 && kv.dtype().lanes == 1, TypeError) << "kv_buffer must hold bytes (8-bit)";
  TVM_FFI_CHECK(kv.stride(-1) == 1 && nope.stride(-1) == 1 && rope.stride(-1) == 1, ValueError)
      << "kv_buffer/k_nope/k_rope: the last dim must be contiguous";
  TVM_FFI_CHECK(nope.size(-1) == kNope && rope.size(-1) == kRope, ValueError)
      << "this module was built for " << kNope << " + " << kRope << " values, got " << nope.size(-1) << " + "
      << rope.size(-1);
  TVM_FFI_CHECK(kv.size(-1) >= kRowBytes, ValueError)
      << "kv_buffer: last dim holds " << kv.size(-1) << " bytes, the row needs " << kRowBytes;
  TVM_FFI_CHECK(kv.size(0) <= 1 || kv.stride(0) >= kv.size(-1), ValueError) << "kv_buffer: rows overlap";
  if (kFormat == 0) {
    TVM_FFI_CHECK(scale.dtype().code == kDLFloat && scale.dtype().bits == 32 && scale.numel() >= 1, TypeError)
        << "k_scale must be a 1-element float32 tensor";
  }
  check_launch_shape(num_warps, threads_per_row, packed_threads(kFormat, kNope, kRope));
  TVM_FFI_CHECK(scale_rule >= kRuleFp32Floor && scale_rule <= kRuleUe8m0, ValueError)
      << "scale_rule must be 0 (fp32_floor), 1 (fp32) or 2 (ue8m0), got " << scale_rule;
  // Every check above holds for any n_loc; a call with no rows is served (nothing to launch) however
  // the tensors are aligned, so the caller never falls back for it.
  if (n_loc == 0) return true;
  const int64_t kv_stride = kv.stride(0);  // bytes: 8-bit elements
  const int64_t nope_stride = nope.stride(0) * 2, rope_stride = rope.stride(0) * 2;
  if (!rows_aligned(kv, kv_stride, 16) || !rows_aligned(nope, nope_stride, 16) || !rows_aligned(rope, rope_stride, 16)) {
    return false;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev.device_id));
  RowArgs a;
  a.kv = tensor_address(kv);
  a.kv_stride = kv_stride;
  a.num_slots = kv.size(0);
  a.nope = tensor_address(nope);
  a.nope_stride = nope_stride;
  a.rope = tensor_address(rope);
  a.rope_stride = rope_stride;
  a.loc = tensor_address(loc);
  a.loc_stride = loc.stride(0);
  a.n_loc = n_loc;
  a.skip_index = skip_slot;
  a.dcp_world = 1;
  a.dcp_rank = 0;
  const auto* k_scale = reinterpret_cast<const float*>(tensor_address(scale));
  const int w = static_cast<int>(num_warps);
  const int tpr = static_cast<int>(threads_per_row);
  const bool loc32 = loc.dtype().bits == 32;
#define MLAKV_FP8_RULE(RULE) \
  launch_quant_rule<kFormat, RULE, kNope, kRope, kUsePDL>(a, k_scale, is_bf16, loc32, w, early_trigger, tpr, stream)
  if constexpr (kFormat == 0) {  // per_tensor: one scale for the cache, no tile rule
    MLAKV_FP8_RULE(kRuleFp32Floor);
  } else if (scale_rule == kRuleFp32Floor) {
    MLAKV_FP8_RULE(kRuleFp32Floor);
  } else if (scale_rule == kRuleFp32) {
    MLAKV_FP8_RULE(kRuleFp32);
  } else {
    MLAKV_FP8_RULE(kRuleUe8m0);
  }
#undef MLAKV_FP8_RULE
  return true;
}


// ---------------------------------------------------------------------------------------------
// Dequantizing gather: out[i] = dequantize(kv[loc[i]]) in bf16 (kDst 0), fp16 (1) or fp32 (2).
// kThreads (32, 64 or 128) threads per row; thread t decodes the row's chunks c = t + kThreads*i: an
// 8-byte e4m3 chunk of 8 values (cvt.rn.f16x2.e4m3x2 is exact) multiplied by the fp32 scale (k_scale,
// or the chunk's tile scale read from the row) and rounded to the destination (RNE; NaN as the
// canonical quiet NaN); in ds_mla the chunks past the nope are the rope's 16-byte bf16 chunks, the
// stored bf16. A slot outside [0, num_slots) reads nothing and gives a zero row.
// ---------------------------------------------------------------------------------------------
template <int kDst>
struct DstOf;
template <>
struct DstOf<0> {
  static constexpr int kBytes = 2;
  __device__ __forceinline__ static uint32_t bits(float x) { return bf16_bits(x); }
};
template <>
struct DstOf<1> {
  static constexpr int kBytes = 2;
  __device__ __forceinline__ static uint32_t bits(float x) {
    if (x != x) return 0x7e00u;
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(x)));
  }
};
template <>
struct DstOf<2> {
  static constexpr int kBytes = 4;
  __device__ __forceinline__ static uint32_t bits(float x) { return x != x ? 0x7fc00000u : __float_as_uint(x); }
};

// 8 e4m3 bytes -> 8 fp32 (exact).
__device__ __forceinline__ void e4m3x8_to_float(uint2 q, float f[8]) {
  const uint32_t w[2] = {q.x, q.y};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint16_t pair = static_cast<uint16_t>(w[j] >> (16 * h));
      uint32_t f16x2;
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(f16x2) : "h"(pair));
      __half2 hv;
      memcpy(&hv, &f16x2, 4);
      const float2 p = __half22float2(hv);
      f[4 * j + 2 * h] = p.x;
      f[4 * j + 2 * h + 1] = p.y;
    }
  }
}

// 8 destination values (bits) to dst (16 or 32 bytes, aligned).
template <int kDst>
__device__ __forceinline__ void store8(uint8_t* dst, const uint32_t b[8]) {
  if constexpr (DstOf<kDst>::kBytes == 2) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(b[0] | (b[1] << 16), b[2] | (b[3] << 16), b[4] | (b[5] << 16),
                                                b[6] | (b[7] << 16));
  } else {
    reinterpret_cast<uint4*>(dst)[0] = make_uint4(b[0], b[1], b[2], b[3]);
    reinterpret_cast<uint4*>(dst)[1] = make_uint4(b[4], b[5], b[6], b[7]);
  }
}

// With kUsePDL the gather launches while the kernel before it runs (programmatic dependent launch)
// and waits for it (griddepcontrol.wait) before its first read: loc, the scale and the rows may be
// that kernel's output, and the outputs may reuse memory it still reads. The trigger that lets the
// next kernel launch comes at entry (kEarlyTrigger) or right after the wait, as the FP8 family's
// launch row for the gather says. tests/test_jit_load_order.py checks in the machine code that no
// global load comes before the wait.
template <int kFormat, int kNope, int kRope, int kDst, int kThreads, bool kUsePDL, bool kEarlyTrigger, typename LocT>
__global__ void dequant_gather_kernel(const uint8_t* __restrict__ kv, int64_t kv_stride, const LocT* __restrict__ loc,
                                      int64_t loc_stride, int64_t n_loc, int64_t num_slots,
                                      const float* __restrict__ k_scale, uint8_t* __restrict__ nope_out,
                                      uint8_t* __restrict__ rope_out) {
  static_assert(kThreads == 32 || kThreads == 64 || kThreads == 128, "32, 64 or 128 threads per row");
  constexpr int kOut = DstOf<kDst>::kBytes;
  const int t = threadIdx.x % kThreads;  // blockDim.x = kThreads * rows per CTA
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kThreads) + threadIdx.x / kThreads;
  if constexpr (kUsePDL && kEarlyTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (item >= n_loc) return;
  const LocT* lp = loc + item * loc_stride;
  uint8_t* n_dst = nope_out + item * (static_cast<int64_t>(kNope) * kOut);
  uint8_t* r_dst = rope_out + item * (static_cast<int64_t>(kRope) * kOut);
  if constexpr (kUsePDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if constexpr (kUsePDL && !kEarlyTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int64_t slot = static_cast<int64_t>(*lp);
  const bool valid = slot >= 0 && slot < num_slots;
  const uint8_t* src = kv + (valid ? slot : 0) * kv_stride;
  constexpr int kNC = kNope / 8;
  // With more than one chunk per thread, every load of the row is issued before the first conversion,
  // in a loop of its own: written as load-convert-store per chunk, nvcc 13 laid a thread's last chunk's
  // load after its earlier chunks' stores and a test of the lane, a second memory round trip (H200,
  // 65536 rows at 32 threads per row: per_tensor 33.5 -> 31.3 us, ds_mla 34.3 -> 32.9). The per_tensor
  // gather with one chunk per thread keeps its load in the chunk's block, which measured faster there
  // (1.35 against 1.45 us at one row: nvcc then loads the scale with loc).
  if constexpr (kFormat == 0) {
    constexpr int kC = (kNope + kRope) / 8;
    constexpr int kIt = (kC + kThreads - 1) / kThreads;
    const float scale = __ldg(k_scale);
    uint2 q[kIt];
    if constexpr (kIt > 1) {
#pragma unroll
      for (int i = 0; i < kIt; ++i) {
        const int c = t + kThreads * i;
        q[i] = valid && c < kC ? __ldg(reinterpret_cast<const uint2*>(src) + c) : make_uint2(0, 0);
      }
    }
#pragma unroll
    for (int i = 0; i < kIt; ++i) {
      const int c = t + kThreads * i;
      if (c < kC) {
        if constexpr (kIt == 1) q[i] = valid ? __ldg(reinterpret_cast<const uint2*>(src) + c) : make_uint2(0, 0);
        float f[8];
        uint32_t b[8];
        e4m3x8_to_float(q[i], f);
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = DstOf<kDst>::bits(f[j] * scale);
        store8<kDst>(c < kNC ? n_dst + c * 8 * kOut : r_dst + (c - kNC) * 8 * kOut, b);
      }
    }
  } else {
    constexpr int kRopeOff = kNope + 4 * (kNope / 128);
    constexpr int kRC = kRope / 8;
    constexpr int kNI = (kNC + kThreads - 1) / kThreads;
    constexpr int kRI = (kRC + kThreads - 1) / kThreads;
    // Rope chunk r (16 bf16 bytes) is the row's chunk kNC + r, on thread (kNC + r) % kThreads, as in
    // the write (with 32 threads per row: the one-warp kernel as it was).
    const int rt = kNC % kThreads == 0 ? t : (t + kThreads - kNC % kThreads) % kThreads;
    uint2 q[kNI];
    float scale[kNI];
    uint4 r[kRI];
#pragma unroll
    for (int i = 0; i < kNI; ++i) {
      const int c = t + kThreads * i;
      const bool live = valid && c < kNC;
      q[i] = live ? __ldg(reinterpret_cast<const uint2*>(src) + c) : make_uint2(0, 0);
      scale[i] = live ? __ldg(reinterpret_cast<const float*>(src + kNope) + (c >> 4)) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kRI; ++i) {
      const int c = rt + kThreads * i;
      r[i] = valid && c < kRC ? __ldg(reinterpret_cast<const uint4*>(src + kRopeOff) + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kNI; ++i) {
      const int c = t + kThreads * i;
      if (c < kNC) {
        float f[8];
        uint32_t b[8];
        e4m3x8_to_float(q[i], f);
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = DstOf<kDst>::bits(f[j] * scale[i]);
        store8<kDst>(n_dst + c * 8 * kOut, b);
      }
    }
#pragma unroll
    for (int i = 0; i < kRI; ++i) {
      const int c = rt + kThreads * i;
      if (c < kRC) {
        if constexpr (kDst == 0) {
          *reinterpret_cast<uint4*>(r_dst + c * 16) = r[i];  // the stored bf16, bit for bit
        } else {
          float f[8];
          uint32_t b[8];
          widen8<true>(r[i], f);
#pragma unroll
          for (int j = 0; j < 8; ++j) b[j] = DstOf<kDst>::bits(f[j]);
          store8<kDst>(r_dst + c * 8 * kOut, b);
        }
      }
    }
  }
}

template <int kFormat, int kNope, int kRope, int kDst, int kThreads, bool kUsePDL, typename LocT>
void launch_gather_typed(const uint8_t* kv, int64_t kv_stride, const void* loc, int64_t loc_stride, int64_t n_loc,
                         int64_t num_slots, const float* scale, uint8_t* nope_out, uint8_t* rope_out, int num_warps,
                         bool early_trigger, cudaStream_t stream) {
  const int rows = num_warps * 32 / kThreads;  // rows per CTA (the caller checked the division is exact)
  const int64_t blocks = (n_loc + rows - 1) / rows;
  TVM_FFI_CHECK(blocks <= 0x7fffffff, ValueError) << "n_loc=" << n_loc << " needs too many blocks";
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg =
      launch_config(dim3(static_cast<unsigned>(blocks)), dim3(num_warps * 32), 0, stream, kUsePDL, attr);
  const auto* lp = static_cast<const LocT*>(loc);
  TVM_FFI_CHECK_CUDA_ERROR(
      early_trigger
          ? cudaLaunchKernelEx(&cfg, dequant_gather_kernel<kFormat, kNope, kRope, kDst, kThreads, kUsePDL, true, LocT>,
                               kv, kv_stride, lp, loc_stride, n_loc, num_slots, scale, nope_out, rope_out)
          : cudaLaunchKernelEx(&cfg, dequant_gather_kernel<kFormat, kNope, kRope, kDst, kThreads, kUsePDL, false, LocT>,
                               kv, kv_stride, lp, loc_stride, n_loc, num_slots, scale, nope_out, rope_out));
}

// kv: [num_slots, (1,) >= row_bytes] 8-bit; loc: [n_loc] int32/int64 (any stride); scale: per_tensor
// 1-element fp32; nope_out [n_loc, kNope] and rope_out [n_loc, kRope]: contiguous, one dtype of
// bf16/fp16/fp32; num_warps (the CTA's) and threads_per_row as for the write (check_launch_shape);
// early_trigger: with kUsePDL, the PDL trigger at kernel entry (else right after the wait).
// Returns false, launching nothing, when an address of kv, nope_out or rope_out or kv's row stride
// is not 16-byte aligned (n_loc == 0 returns true after the checks, launching nothing, whatever the
// alignment).
template <int kFormat, int kNope, int kRope, bool kUsePDL>
bool launch_mla_fp8_gather(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView scale,
                           tvm::ffi::TensorView nope_out, tvm::ffi::TensorView rope_out, int64_t num_warps,
                           bool early_trigger, int64_t threads_per_row) {
  constexpr int64_t kRowBytes = kFormat == 0 ? kNope + kRope : kNope + 4 * (kNope / 128) + 2 * kRope;
  TVM_FFI_CHECK(loc.ndim() == 1, ValueError) << "loc must be 1-D [n_loc], got " << loc.ndim() << "-D";
  TVM_FFI_CHECK(kv.ndim() == 2 || (kv.ndim() == 3 && kv.size(1) == 1), ValueError)
      << "kv_buffer must be 2-D [num_slots, d] or 3-D [num_slots, 1, d]";
  const DLDevice dev = kv.device();
  const auto on_dev = [&dev](const tvm::ffi::TensorView& t) {
    return t.device().device_type == dev.device_type && t.device().device_id == dev.device_id;
  };
  TVM_FFI_CHECK(dev.device_type == kDLCUDA && on_dev(loc) && on_dev(scale) && on_dev(nope_out) && on_dev(rope_out),
                ValueError)
      << "kv_buffer, loc, k_scale and the outputs must be on one CUDA device";
  TVM_FFI_CHECK(loc.dtype().code == kDLInt && (loc.dtype().bits == 32 || loc.dtype().bits == 64), TypeError)
      << "loc must be int32 or int64";
  TVM_FFI_CHECK(kv.dtype().bits == 8 && kv.dtype().lanes == 1 && kv.stride(-1) == 1, TypeError)
      << "kv_buffer must hold bytes (8-bit) with a contiguous last dim";
  TVM_FFI_CHECK(kv.size(-1) >= kRowBytes, ValueError)
      << "kv_buffer: last dim holds " << kv.size(-1) << " bytes, the row needs " << kRowBytes;
  const int64_t n_loc = loc.size(0);
  const DLDataType od = nope_out.dtype();
  int dst = -1;
  if (od.code == kDLBfloat && od.bits == 16) dst = 0;
  else if (od.code == kDLFloat && od.bits == 16) dst = 1;
  else if (od.code == kDLFloat && od.bits == 32) dst = 2;
  TVM_FFI_CHECK(dst >= 0 && od.lanes == 1 && rope_out.dtype() == od, TypeError)
      << "nope_out/rope_out must both be bfloat16, float16 or float32";
  TVM_FFI_CHECK(nope_out.ndim() == 2 && rope_out.ndim() == 2 && nope_out.size(0) == n_loc && rope_out.size(0) == n_loc &&
                    nope_out.size(1) == kNope && rope_out.size(1) == kRope && nope_out.IsContiguous() &&
                    rope_out.IsContiguous(),
                ValueError)
      << "nope_out/rope_out must be contiguous [n_loc, " << kNope << "] and [n_loc, " << kRope << "]";
  if (kFormat == 0) {
    TVM_FFI_CHECK(scale.dtype().code == kDLFloat && scale.dtype().bits == 32 && scale.numel() >= 1, TypeError)
        << "k_scale must be a 1-element float32 tensor";
  }
  check_launch_shape(num_warps, threads_per_row);
  if (n_loc == 0) return true;  // served for any alignment: nothing to launch (the checks above still ran)
  const int64_t kv_stride = kv.stride(0);
  // Every pointer with its tensor's byte_offset (a view's start), as the write takes them; the outputs
  // are contiguous, so their first byte is what needs the alignment.
  if (!rows_aligned(kv, kv_stride, 16) || !rows_aligned(nope_out, 0, 16) || !rows_aligned(rope_out, 0, 16)) {
    return false;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, dev.device_id));
  const uint8_t* kv_ptr = tensor_address(kv);
  const auto* s_ptr = reinterpret_cast<const float*>(tensor_address(scale));
  uint8_t* n_ptr = tensor_address(nope_out);
  uint8_t* r_ptr = tensor_address(rope_out);
  const void* loc_ptr = tensor_address(loc);
  const int64_t loc_stride = loc.stride(0), num_slots = kv.size(0);
  const int w = static_cast<int>(num_warps);
#define MLAKV_FP8_GATHER(DST, T, LOCT)                                                                          \
  launch_gather_typed<kFormat, kNope, kRope, DST, T, kUsePDL, LOCT>(kv_ptr, kv_stride, loc_ptr, loc_stride, n_loc, \
                                                                    num_slots, s_ptr, n_ptr, r_ptr, w, early_trigger, \
                                                                    stream)
#define MLAKV_FP8_GATHER_T(DST, LOCT)                             \
  if (threads_per_row == 32) MLAKV_FP8_GATHER(DST, 32, LOCT);     \
  else if (threads_per_row == 64) MLAKV_FP8_GATHER(DST, 64, LOCT); \
  else MLAKV_FP8_GATHER(DST, 128, LOCT)
  const bool i32 = loc.dtype().bits == 32;
  if (dst == 0) {
    if (i32) {
      MLAKV_FP8_GATHER_T(0, int32_t);
    } else {
      MLAKV_FP8_GATHER_T(0, int64_t);
    }
  } else if (dst == 1) {
    if (i32) {
      MLAKV_FP8_GATHER_T(1, int32_t);
    } else {
      MLAKV_FP8_GATHER_T(1, int64_t);
    }
  } else {
    if (i32) {
      MLAKV_FP8_GATHER_T(2, int32_t);
    } else {
      MLAKV_FP8_GATHER_T(2, int64_t);
    }
  }
#undef MLAKV_FP8_GATHER_T
#undef MLAKV_FP8_GATHER
  return true;
}

}  // namespace fp8
}  // namespace mlakv
