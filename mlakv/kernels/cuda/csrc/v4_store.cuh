// DeepSeek-V4 family paged caches: the quantizing store pages[loc[i]] = encode(rope?(kv[i])).
//
// The layouts and their rules are specified (and implemented in plain torch) in
// mlakv/ops/v4_reference.py; this kernel is bit-exact with it. Encodings (kEnc):
//   0 v4:      448 e4m3 (tiles of 64, ue8m0 scale, floor 2^-22) + 64 bf16 rope; 7 scale bytes (+1 pad, untouched)
//   1 v41:     512 e4m3 (tiles of 32, ue8m0 scale, floor 2^-13); 16 scale bytes
//   2 v41_fp4: 512 e2m1 two per byte (tiles of 16, e4m3 scale = e4m3(clamp(amax / 6, 2^-9, 448))); 32 scale bytes
// A page holds page_size tokens; token row r's values are at byte r * data_stride of its page and its
// scales at scale_base + r * scale_stride (block-split: data rows, then scale rows; interleaved, the
// _new layouts: each token's scales right after its values). The launcher derives these numbers.
//
// One warp per token (kItems tokens per warp, their loads issued together). Lane l holds elements
// [16 l, 16 l + 16) as eight packed 16-bit pairs (two 16-byte loads), so the RoPE tail (elements
// 448..511) is lanes 28..31, a v41 tile is a lane pair, a v4 tile a lane quad, a fp4 tile one lane.
//   * tile amax: |x| as bf16x2/f16x2 with max.NaN (a NaN dominates), then __shfl_xor_sync over the tile;
//   * ue8m0 scale exponent from the amax's bits (exact, no division), values times the exact inverse
//     power of two and cvt.rn.satfinite.e4m3x2.f32 (round to nearest even): one 16-byte store a lane;
//   * e2m1: the code of x / scale (nearest even, as the IEEE quotient gives it for 16-bit inputs) is
//     found by comparing |x| with the exact thresholds m_j * scale (m = .25 .75 1.25 1.75 2.5 3.5 5),
//     a three-level search done on packed pairs (set.ge/gt.u32.{bf16x2,f16x2}): no division per value;
//   * scale bytes gathered by shuffles into 4-byte stores (v4: one byte from each tile's first lane);
//   * NaN / inf tiles (the oracle's rules) take a rare, tile-uniform branch.
// In-kernel RoPE (kRope 1: freqs_cis [n, 64] (cos, sin) pairs; 2: positions [n] into cos_sin_cache
// [max_pos, 64] = cos | sin) rotates the tail's 32 pairs one per lane (shuffled out of the tail
// lanes and back: the rotation costs every lane one pair, not four lanes eight; each lane loads its
// own (cos, sin), so the loads are coalesced) in fp32 with separately rounded products
// (__fmul_rn / __fadd_rn: no contraction into FMA) and rounds them back to the input dtype (nearest
// even, canonical NaN) before quantizing.
//
// Row selection (the library's rule): loc read at its stride; a token is skipped when loc < 0,
// loc == skip_index, with DCP (dcp_world > 1) loc % dcp_world != dcp_rank, when its slot
// (loc / dcp_world) is >= num_slots, or (kRope 2) when its position lies outside the table: nothing
// outside the tensors is ever read or written. Without DCP the source loads do not wait for loc.
// All offsets are 64-bit. PDL: griddepcontrol.wait before any input is read; the next grid is let
// go at entry (early_trigger) or right after the wait.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstdint>

#include "row_args.cuh"

namespace mlakv {
namespace v4 {

constexpr int kEncV4 = 0, kEncV41 = 1, kEncFP4 = 2;
constexpr int kRopeNone = 0, kRopeFreqs = 1, kRopeTable = 2;

// Layout codes of the launcher (mlakv's own): 0 v4, 1 v41, 2 v41_fp4, 3 v41_new, 4 v41_fp4_new.
struct Geometry {
  int enc;
  int64_t value_bytes, scale_bytes, page_align;
  bool interleaved;
};
__host__ __device__ constexpr Geometry geometry(int layout) {
  return layout == 0   ? Geometry{kEncV4, 576, 8, 576, false}
         : layout == 1 ? Geometry{kEncV41, 512, 16, 512, false}
         : layout == 2 ? Geometry{kEncFP4, 256, 32, 256, false}
         : layout == 3 ? Geometry{kEncV41, 512, 16, 528, true}
                       : Geometry{kEncFP4, 256, 32, 288, true};
}
// Bytes of a page of page_size tokens: padded up to the layout's alignment.
inline int64_t page_bytes(int layout, int64_t page_size) {
  const Geometry g = geometry(layout);
  const int64_t raw = page_size * (g.value_bytes + g.scale_bytes);
  return (raw + g.page_align - 1) / g.page_align * g.page_align;
}

struct StoreArgs {
  uint8_t* pages;
  int64_t page_stride, num_slots, data_stride, scale_base, scale_stride;
  int32_t page_shift;
  const uint8_t* kv;
  int64_t kv_stride;  // bytes
  const void* loc;
  int64_t loc_stride, n;  // elements
  const uint8_t* cs;      // freqs_cis or cos_sin_cache
  int64_t cs_stride;      // bytes
  const void* pos;
  int64_t pos_stride, max_pos;  // elements
  int32_t pos_is_64, early_trigger;
  int64_t skip_index, dcp_world, dcp_rank;
};

// ---- the 16-bit input type ----------------------------------------------------------------------

template <bool kBF16>
struct In16;

template <>
struct In16<true> {  // bf16
  static constexpr uint32_t kInf = 0x7F80u;
  __device__ __forceinline__ static float2 unpack(uint32_t h) {
    return make_float2(__uint_as_float(h << 16), __uint_as_float(h & 0xFFFF0000u));
  }
  __device__ __forceinline__ static uint32_t round(float f) {  // nearest even, NaN -> 0x7FC0
    const uint32_t u = __float_as_uint(f);
    return f != f ? 0x7FC0u : ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  __device__ __forceinline__ static uint32_t max_nan(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
  __device__ __forceinline__ static uint32_t to_f32_bits(uint32_t h16) { return h16 << 16; }
  __device__ __forceinline__ static uint32_t ge_mask(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("set.ge.u32.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
  __device__ __forceinline__ static uint32_t gt_mask(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("set.gt.u32.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
  __device__ __forceinline__ static uint32_t exact16(float f) { return __float_as_uint(f) >> 16; }  // f has <= 8 bits
};

template <>
struct In16<false> {  // fp16
  static constexpr uint32_t kInf = 0x7C00u;
  __device__ __forceinline__ static float2 unpack(uint32_t h) {
    __half2 v;
    memcpy(&v, &h, 4);
    return __half22float2(v);
  }
  __device__ __forceinline__ static uint32_t round(float f) {  // nearest even, NaN -> 0x7E00
    return f != f ? 0x7E00u : static_cast<uint32_t>(__half_as_ushort(__float2half_rn(f)));
  }
  __device__ __forceinline__ static uint32_t max_nan(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
  __device__ __forceinline__ static uint32_t to_f32_bits(uint32_t h16) {
    return __float_as_uint(__half2float(__ushort_as_half(static_cast<unsigned short>(h16))));
  }
  __device__ __forceinline__ static uint32_t ge_mask(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("set.ge.u32.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
  __device__ __forceinline__ static uint32_t gt_mask(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("set.gt.u32.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
  }
  __device__ __forceinline__ static uint32_t exact16(float f) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(f)));
  }
};

// fp32 bits of a lane's max |x| over its 16 values (NaN > inf > finite, as unsigned).
template <bool kBF16>
__device__ __forceinline__ uint32_t lane_amax_bits(const uint32_t (&h)[8]) {
  uint32_t m = h[0] & 0x7FFF7FFFu;
#pragma unroll
  for (int p = 1; p < 8; ++p) m = In16<kBF16>::max_nan(m, h[p] & 0x7FFF7FFFu);
  const uint32_t lo = In16<kBF16>::to_f32_bits(m & 0xFFFFu), hi = In16<kBF16>::to_f32_bits(m >> 16);
  // a NaN's fp32 bits exceed 0x7F800000 whatever its payload: unsigned max keeps it on top
  return lo > hi ? lo : hi;
}

__device__ __forceinline__ uint32_t sel(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {  // lo in the low byte
  return static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3));
}

// e4m3 bytes of a ue8m0-scaled 16-value chunk: 16 bytes as uint4. tile_bits: the tile's amax bits.
template <bool kBF16>
__device__ __forceinline__ uint4 ue8m0_chunk(const uint32_t (&h)[8], uint32_t tile_bits, int floor_exp, uint32_t& scale_byte) {
  uint32_t w[4];
  if (tile_bits < 0x7F800000u) {
    const int e = max(static_cast<int>(tile_bits >> 23) - 8 + static_cast<int>((tile_bits & 0x7FFFFFu) > 0x600000u),
                      floor_exp);
    const float inv = __uint_as_float(static_cast<uint32_t>(254 - e) << 23);  // 2^(127 - e), exact
    scale_byte = static_cast<uint32_t>(e);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 a = In16<kBF16>::unpack(h[2 * q]);
      const float2 b = In16<kBF16>::unpack(h[2 * q + 1]);
      w[q] = e4m3x2(a.x * inv, a.y * inv) | (e4m3x2(b.x * inv, b.y * inv) << 16);
    }
  } else {  // a NaN or +-inf in the tile (the oracle's rules)
    const bool nan_tile = tile_bits > 0x7F800000u;
    scale_byte = 0xFFu;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t word = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t v = (h[2 * q + (k >> 1)] >> (16 * (k & 1))) & 0xFFFFu;
        const uint32_t mag = v & 0x7FFFu, sign = (v >> 8) & 0x80u;
        const uint32_t b = nan_tile ? (mag > In16<kBF16>::kInf ? (0x7Fu | sign) : 0x7Fu)
                                    : (mag == In16<kBF16>::kInf ? 0xFFu : sign);
        word |= b << (8 * k);
      }
      w[q] = word;
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// e2m1 bytes of one fp4 tile (a lane's 16 values): 8 bytes as uint2, and the scale byte.
template <bool kBF16>
__device__ __forceinline__ uint2 fp4_chunk(const uint32_t (&h)[8], uint32_t tile_bits, uint32_t& scale_byte) {
  uint32_t bytes[8];
  if (tile_bits <= 0x7F800000u) {  // no NaN (an infinity is a huge value: scale 448, code +-6)
    const float raw = fminf(fmaxf(__fdiv_rn(__uint_as_float(tile_bits), 6.0f), 0x1p-9f), 448.0f);
    const __nv_fp8_storage_t sb = __nv_cvt_float_to_fp8(raw, __NV_SATFINITE, __NV_E4M3);
    scale_byte = sb;
    const float s = __half2float(__half(__nv_cvt_fp8_to_halfraw(sb, __NV_E4M3)));
    // thresholds m_j * s are exact in fp32 (<= 7 significant bits) and in the 16-bit input type
    const uint32_t t0 = In16<kBF16>::exact16(0.25f * s) * 0x10001u, t1 = In16<kBF16>::exact16(0.75f * s) * 0x10001u,
                   t2 = In16<kBF16>::exact16(1.25f * s) * 0x10001u, t3 = In16<kBF16>::exact16(1.75f * s) * 0x10001u,
                   t4 = In16<kBF16>::exact16(2.5f * s) * 0x10001u, t5 = In16<kBF16>::exact16(3.5f * s) * 0x10001u,
                   t6 = In16<kBF16>::exact16(5.0f * s) * 0x10001u;
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      const uint32_t a = h[p] & 0x7FFF7FFFu;
      const uint32_t hi = In16<kBF16>::ge_mask(a, t3);   // code >= 4 (tie at 1.75 -> 2, even)
      const uint32_t mid = In16<kBF16>::ge_mask(a, sel(hi, t5, t1));  // ties 3.5 -> 4, 0.75 -> 1
      const uint32_t lo = In16<kBF16>::gt_mask(a, sel(hi, sel(mid, t6, t4), sel(mid, t2, t0)));  // ties stay even
      const uint32_t c = (hi & 0x00040004u) | (mid & 0x00020002u) | (lo & 0x00010001u) | ((h[p] >> 12) & 0x00080008u);
      bytes[p] = (c & 0xFu) | ((c >> 12) & 0xF0u);
    }
  } else {  // a NaN in the tile: scale NaN (0x7F), codes 0, a negative NaN's 0x8
    scale_byte = 0x7Fu;
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      uint32_t b = 0;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const uint32_t v = (h[p] >> (16 * k)) & 0xFFFFu;
        if ((v & 0x7FFFu) > In16<kBF16>::kInf && (v & 0x8000u)) b |= 0x8u << (4 * k);
      }
      bytes[p] = b;
    }
  }
  return make_uint2(bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (bytes[3] << 24),
                    bytes[4] | (bytes[5] << 8) | (bytes[6] << 16) | (bytes[7] << 24));
}

// ---- the kernel -----------------------------------------------------------------------------------

template <typename LocT>
__device__ __forceinline__ int64_t load_index(const void* p, int64_t i) {
  return static_cast<int64_t>(static_cast<const LocT*>(p)[i]);
}

template <int kEnc, bool kBF16, typename LocT, int kRope, int kItems>
__global__ void __launch_bounds__(256) v4_store_kernel(const __grid_constant__ StoreArgs a) {
  const int lane = threadIdx.x;  // blockDim = (32, warps)
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * kItems;
  if (a.early_trigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (first >= a.n) return;
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (!a.early_trigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const bool rope_lane = lane >= 28;

  int64_t slot[kItems];
  uint32_t h[kItems][8];
  float2 cs[kRope == kRopeNone ? 1 : kItems];  // this lane's (cos, sin): the tail's pair `lane`
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t item = first + k;
    slot[k] = -1;
    if (item >= a.n) continue;
    const int64_t raw = load_index<LocT>(a.loc, item * a.loc_stride);
    int64_t pos = 0;
    if constexpr (kRope == kRopeTable) {
      pos = a.pos_is_64 ? load_index<int64_t>(a.pos, item * a.pos_stride) : load_index<int32_t>(a.pos, item * a.pos_stride);
    }
    bool live;
    if (a.dcp_world == 1) {
      live = raw >= 0 && raw != a.skip_index && raw < a.num_slots;
      slot[k] = raw;
    } else {
      const int64_t row = raw / a.dcp_world;
      live = raw >= 0 && raw != a.skip_index && raw - row * a.dcp_world == a.dcp_rank && row < a.num_slots;
      slot[k] = row;
    }
    if constexpr (kRope == kRopeTable) live = live && pos >= 0 && pos < a.max_pos;
    // Without DCP the source load does not wait for loc; with DCP only kept tokens are read.
    if (a.dcp_world == 1 || live) {
      const uint4* src = reinterpret_cast<const uint4*>(a.kv + item * a.kv_stride) + 2 * lane;
      const uint4 v0 = src[0], v1 = src[1];
      h[k][0] = v0.x, h[k][1] = v0.y, h[k][2] = v0.z, h[k][3] = v0.w;
      h[k][4] = v1.x, h[k][5] = v1.y, h[k][6] = v1.z, h[k][7] = v1.w;
    }
    if constexpr (kRope == kRopeFreqs) {  // (cos, sin) of pair `lane`: one coalesced 256-byte row
      if (a.dcp_world == 1 || live) cs[k] = reinterpret_cast<const float2*>(a.cs + item * a.cs_stride)[lane];
    } else if constexpr (kRope == kRopeTable) {  // cos at [lane], sin 32 further
      if (live) {
        const float* row = reinterpret_cast<const float*>(a.cs + pos * a.cs_stride);
        cs[k] = make_float2(row[lane], row[32 + lane]);
      }
    }
    if (!live) slot[k] = -1;
  }

#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (slot[k] < 0) continue;  // warp-uniform: the whole warp holds one token
    if constexpr (kRope != kRopeNone) {
      // Every lane rotates one of the tail's 32 pairs: pair q sits in lane 28 + q / 8, register q % 8;
      // it is shuffled to lane q, rotated there and shuffled back (the warp holds one token here).
      uint32_t mine = 0;
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const uint32_t v = __shfl_sync(0xffffffffu, h[k][p], 28 + (lane >> 3));
        if (p == (lane & 7)) mine = v;
      }
      const float2 v = In16<kBF16>::unpack(mine);
      const float c = cs[k].x, s = cs[k].y;
      const float x = __fsub_rn(__fmul_rn(v.x, c), __fmul_rn(v.y, s));
      const float y = __fadd_rn(__fmul_rn(v.x, s), __fmul_rn(v.y, c));
      const uint32_t rotated = In16<kBF16>::round(x) | (In16<kBF16>::round(y) << 16);
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        const uint32_t back = __shfl_sync(0xffffffffu, rotated, (8 * (lane - 28) + p) & 31);
        if (rope_lane) h[k][p] = back;
      }
    }
    const int64_t page = slot[k] >> a.page_shift;
    const int64_t row = slot[k] - (page << a.page_shift);
    uint8_t* base = a.pages + page * a.page_stride;
    uint8_t* data = base + row * a.data_stride;
    uint8_t* scales = base + a.scale_base + row * a.scale_stride;
    uint32_t bits = lane_amax_bits<kBF16>(h[k]);
    if constexpr (kEnc == kEncV41) {
      bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, 1));
      uint32_t sb;
      reinterpret_cast<uint4*>(data)[lane] = ue8m0_chunk<kBF16>(h[k], bits, 114, sb);
      // tiles 4 lane + j live in lanes 8 lane + 2 j: lanes 0..3 store 4 scale bytes each
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) word |= __shfl_sync(0xffffffffu, sb, 8 * (lane & 3) + 2 * j) << (8 * j);
      if (lane < 4) reinterpret_cast<uint32_t*>(scales)[lane] = word;
    } else if constexpr (kEnc == kEncV4) {
      bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, 1));
      bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, 2));
      if (!rope_lane) {
        uint32_t sb;
        reinterpret_cast<uint4*>(data)[lane] = ue8m0_chunk<kBF16>(h[k], bits, 105, sb);
        if ((lane & 3) == 0) scales[lane >> 2] = static_cast<uint8_t>(sb);
      } else {  // the rope: 16 values as bf16 (fp16 input rounded to bf16, nearest even, canonical NaN)
        uint32_t r[8];
#pragma unroll
        for (int p = 0; p < 8; ++p) {
          if constexpr (kBF16) {
            r[p] = h[k][p];
          } else {
            const float2 v = In16<false>::unpack(h[k][p]);
            r[p] = In16<true>::round(v.x) | (In16<true>::round(v.y) << 16);
          }
        }
        uint4* dst = reinterpret_cast<uint4*>(data + 448) + 2 * (lane - 28);
        dst[0] = make_uint4(r[0], r[1], r[2], r[3]);
        dst[1] = make_uint4(r[4], r[5], r[6], r[7]);
      }
    } else {  // fp4: a tile is one lane
      uint32_t sb;
      reinterpret_cast<uint2*>(data)[lane] = fp4_chunk<kBF16>(h[k], bits, sb);
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) word |= __shfl_sync(0xffffffffu, sb, 4 * (lane & 7) + j) << (8 * j);
      if (lane < 8) reinterpret_cast<uint32_t*>(scales)[lane] = word;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side. The launcher re-checks every fact the kernel's memory safety rests on and raises a
// Python exception (TypeError / ValueError), never faults. The rule book (mlakv/spec/rules.py,
// check_v4_store) holds the same rules; tests/test_v4_jit.py walks both over one table.
// ---------------------------------------------------------------------------------------------

inline bool v4_same_device(const tvm::ffi::TensorView& a, const tvm::ffi::TensorView& b) {
  return a.device().device_type == b.device().device_type && a.device().device_id == b.device().device_id;
}
inline bool v4_is_index(const tvm::ffi::TensorView& t) {
  return t.dtype().code == kDLInt && (t.dtype().bits == 32 || t.dtype().bits == 64) && t.dtype().lanes == 1;
}
inline bool v4_is_f32(const tvm::ffi::TensorView& t) {
  return t.dtype().code == kDLFloat && t.dtype().bits == 32 && t.dtype().lanes == 1;
}

// The checks alone (any device; the parity test calls them on CPU tensors). Raises for invalid
// arguments; returns false when they are valid but an address or row stride is not a multiple of 16
// bytes (pages, kv rows, freqs / table rows): the caller then takes another path.
// pages: [num_pages, page_bytes(layout, page_size)] uint8; loc: [n] int32/int64; kv: [n, (1,) 512]
// bf16/fp16; rope 1: freqs [n, 64] fp32; rope 2: positions [n] int32/int64, table [max_pos, 64] fp32.
inline bool check_v4_store(tvm::ffi::TensorView pages, tvm::ffi::TensorView loc, tvm::ffi::TensorView kv,
                           tvm::ffi::TensorView freqs, tvm::ffi::TensorView positions, tvm::ffi::TensorView table,
                           int64_t layout, int64_t page_size, int64_t rope, int64_t dcp_world, int64_t dcp_rank) {
  TVM_FFI_CHECK(layout >= 0 && layout <= 4, ValueError) << "layout code must be 0..4, got " << layout;
  TVM_FFI_CHECK(page_size >= 1 && page_size <= (int64_t{1} << 20) && (page_size & (page_size - 1)) == 0, ValueError)
      << "page_size must be a power of two in [1, 2^20], got " << page_size;
  TVM_FFI_CHECK(rope >= 0 && rope <= 2, ValueError) << "rope mode must be 0, 1 or 2, got " << rope;
  TVM_FFI_CHECK(pages.ndim() == 2, ValueError) << "kv_pages must be 2-D [num_pages, page_bytes], got " << pages.ndim()
                                               << "-D";
  TVM_FFI_CHECK(pages.dtype().code == kDLUInt && pages.dtype().bits == 8 && pages.dtype().lanes == 1, TypeError)
      << "kv_pages must be uint8";
  const int64_t pb = page_bytes(static_cast<int>(layout), page_size);
  TVM_FFI_CHECK(pages.size(1) == pb, ValueError)
      << "kv_pages: dim 1 must be the page's " << pb << " bytes, got " << pages.size(1);
  TVM_FFI_CHECK(pages.stride(1) == 1 && (pages.size(0) <= 1 || pages.stride(0) >= pb), ValueError)
      << "kv_pages: bytes must be contiguous and pages must not overlap";
  TVM_FFI_CHECK(loc.ndim() == 1, ValueError) << "loc must be 1-D [n], got " << loc.ndim() << "-D";
  TVM_FFI_CHECK(v4_is_index(loc), TypeError) << "loc must be int32 or int64";
  const int64_t n = loc.size(0);
  TVM_FFI_CHECK(kv.ndim() == 2 || (kv.ndim() == 3 && kv.size(1) == 1), ValueError)
      << "kv must be [n, 512] or [n, 1, 512]";
  const DLDataType kd = kv.dtype();
  TVM_FFI_CHECK(kd.lanes == 1 && kd.bits == 16 && (kd.code == kDLBfloat || kd.code == kDLFloat), TypeError)
      << "kv must be bfloat16 or float16";
  TVM_FFI_CHECK(kv.size(0) == n && kv.size(-1) == 512 && kv.stride(-1) == 1, ValueError)
      << "kv must be [n, 512] with n = len(loc) = " << n << " and a contiguous last dim";
  TVM_FFI_CHECK(v4_same_device(pages, loc) && v4_same_device(pages, kv), ValueError)
      << "kv_pages, loc and kv must be on one device";
  TVM_FFI_CHECK(dcp_world >= 1 && dcp_rank >= 0 && dcp_rank < dcp_world, ValueError)
      << "dcp_rank=" << dcp_rank << " must lie in [0, dcp_world_size=" << dcp_world << ")";
  const auto misaligned = [](const tvm::ffi::TensorView& t) { return !rows_aligned(t, t.stride(0) * elem_bytes(t), 16); };
  bool aligned = !misaligned(pages) && !misaligned(kv);
  if (rope == kRopeFreqs) {
    TVM_FFI_CHECK(freqs.ndim() == 2 && v4_is_f32(freqs), TypeError) << "freqs_cis must be a 2-D float32 [n, 64] tensor";
    TVM_FFI_CHECK(freqs.size(0) == n && freqs.size(1) == 64 && freqs.stride(1) == 1, ValueError)
        << "freqs_cis must be [n, 64] with a contiguous last dim";
    TVM_FFI_CHECK(v4_same_device(pages, freqs), ValueError) << "freqs_cis must be on kv_pages' device";
    aligned = aligned && !misaligned(freqs);
  } else if (rope == kRopeTable) {
    TVM_FFI_CHECK(positions.ndim() == 1 && v4_is_index(positions), TypeError) << "positions must be 1-D int32/int64";
    TVM_FFI_CHECK(positions.size(0) == n, ValueError) << "positions must have n = len(loc) = " << n << " entries";
    TVM_FFI_CHECK(table.ndim() == 2 && v4_is_f32(table), TypeError) << "cos_sin_cache must be a 2-D float32 tensor";
    TVM_FFI_CHECK(table.size(1) == 64 && table.stride(1) == 1, ValueError)
        << "cos_sin_cache must be [max_pos, 64] (cos | sin) with a contiguous last dim";
    TVM_FFI_CHECK(v4_same_device(pages, positions) && v4_same_device(pages, table), ValueError)
        << "positions and cos_sin_cache must be on kv_pages' device";
    aligned = aligned && !misaligned(table);
  }
  return aligned;
}

template <int kEnc, bool kBF16, typename LocT, int kRope>
void v4_launch_items(const StoreArgs& a, int num_warps, int items, bool pdl, cudaStream_t stream) {
  const int64_t per_cta = static_cast<int64_t>(num_warps) * items;
  const int64_t blocks = (a.n + per_cta - 1) / per_cta;
  TVM_FFI_CHECK(blocks <= 0x7fffffff, ValueError) << "n=" << a.n << " needs too many blocks";
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config(dim3(static_cast<unsigned>(blocks)), dim3(32, static_cast<unsigned>(num_warps)),
                                               0, stream, pdl, attr);
  if (items == 2) {
    TVM_FFI_CHECK_CUDA_ERROR(cudaLaunchKernelEx(&cfg, v4_store_kernel<kEnc, kBF16, LocT, kRope, 2>, a));
  } else {
    TVM_FFI_CHECK_CUDA_ERROR(cudaLaunchKernelEx(&cfg, v4_store_kernel<kEnc, kBF16, LocT, kRope, 1>, a));
  }
}

template <int kEnc, bool kBF16, typename LocT>
void v4_launch_rope(const StoreArgs& a, int rope, int num_warps, int items, bool pdl, cudaStream_t stream) {
  if (rope == kRopeFreqs) return v4_launch_items<kEnc, kBF16, LocT, kRopeFreqs>(a, num_warps, items, pdl, stream);
  if (rope == kRopeTable) return v4_launch_items<kEnc, kBF16, LocT, kRopeTable>(a, num_warps, items, pdl, stream);
  v4_launch_items<kEnc, kBF16, LocT, kRopeNone>(a, num_warps, items, pdl, stream);
}

// Checks, then launches on the current stream: num_warps (warps per CTA) in {1, 2, 4, 8}, items (tokens per warp) 1 or 2, early_trigger: the PDL trigger at entry.
// skip_index: a loc value to skip (< 0: none). Returns false, launching nothing, when the
// alignment does not suit the kernel. This module serves the layouts of encoding kEnc only.
template <int kEnc>
bool launch_v4_store(tvm::ffi::TensorView pages, tvm::ffi::TensorView loc, tvm::ffi::TensorView kv,
                     tvm::ffi::TensorView freqs, tvm::ffi::TensorView positions, tvm::ffi::TensorView table,
                     int64_t layout, int64_t page_size, int64_t rope, int64_t skip_index, int64_t dcp_world,
                     int64_t dcp_rank, int64_t num_warps, int64_t items, bool early_trigger, bool pdl) {
  const bool aligned = check_v4_store(pages, loc, kv, freqs, positions, table, layout, page_size, rope, dcp_world, dcp_rank);
  TVM_FFI_CHECK(geometry(static_cast<int>(layout)).enc == kEnc, ValueError)
      << "layout code " << layout << " is not served by this module (encoding " << kEnc << ")";
  TVM_FFI_CHECK(pages.device().device_type == kDLCUDA, ValueError) << "kv_pages must be a CUDA tensor";
  TVM_FFI_CHECK(num_warps >= 1 && num_warps <= 8 && (num_warps & (num_warps - 1)) == 0, ValueError)
      << "num_warps must be 1, 2, 4 or 8, got " << num_warps;
  TVM_FFI_CHECK(items == 1 || items == 2, ValueError) << "items (tokens per warp) must be 1 or 2, got " << items;
  if (!aligned) return false;
  const int64_t n = loc.size(0);
  if (n == 0) return true;
  const Geometry g = geometry(static_cast<int>(layout));
  StoreArgs a{};
  a.pages = tensor_address(pages);
  a.page_stride = pages.stride(0);
  a.num_slots = pages.size(0) * page_size;
  a.data_stride = g.interleaved ? g.value_bytes + g.scale_bytes : g.value_bytes;
  a.scale_base = g.interleaved ? g.value_bytes : page_size * g.value_bytes;
  a.scale_stride = g.interleaved ? g.value_bytes + g.scale_bytes : g.scale_bytes;
  int shift = 0;
  while ((int64_t{1} << shift) < page_size) ++shift;
  a.page_shift = shift;
  a.kv = tensor_address(kv);
  a.kv_stride = kv.stride(0) * 2;
  a.loc = tensor_address(loc);
  a.loc_stride = loc.stride(0);
  a.n = n;
  a.cs = rope == kRopeFreqs ? tensor_address(freqs) : rope == kRopeTable ? tensor_address(table) : nullptr;
  a.cs_stride = rope == kRopeFreqs ? freqs.stride(0) * 4 : rope == kRopeTable ? table.stride(0) * 4 : 0;
  a.pos = rope == kRopeTable ? tensor_address(positions) : nullptr;
  a.pos_stride = rope == kRopeTable ? positions.stride(0) : 0;
  a.max_pos = rope == kRopeTable ? table.size(0) : 0;
  a.pos_is_64 = rope == kRopeTable && positions.dtype().bits == 64;
  a.early_trigger = early_trigger ? 1 : 0;
  a.skip_index = skip_index < 0 ? -1 : skip_index;
  a.dcp_world = dcp_world;
  a.dcp_rank = dcp_rank;
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, pages.device().device_id));
  const bool bf16 = kv.dtype().code == kDLBfloat;
  const bool i64 = loc.dtype().bits == 64;
  const int w = static_cast<int>(num_warps), it = static_cast<int>(items), r = static_cast<int>(rope);
  if (bf16) {
    i64 ? v4_launch_rope<kEnc, true, int64_t>(a, r, w, it, pdl, stream) : v4_launch_rope<kEnc, true, int32_t>(a, r, w, it, pdl, stream);
  } else {
    i64 ? v4_launch_rope<kEnc, false, int64_t>(a, r, w, it, pdl, stream) : v4_launch_rope<kEnc, false, int32_t>(a, r, w, it, pdl, stream);
  }
  return true;
}

}  // namespace v4
}  // namespace mlakv
