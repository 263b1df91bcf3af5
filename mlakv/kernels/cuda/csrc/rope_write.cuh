// The fused cache step of an MLA layer, one launch: RoPE on k_pe (and q_pe), the cache-row write in
// the pool's format, and the absorbed query q_out = [q_nope | rotated q_pe].
//
// The semantics are those of mlakv/ops/rope_write_reference.py, bit for bit:
//   * pair j of a head's 64 rope values is (x[j], x[j + 32]) (neox) or (x[2j], x[2j + 1]) (interleaved);
//     with c = cos[j], s = sin[j] from cos_sin_cache[position] (row = 32 cos | 32 sin, fp32) it becomes
//     (x c - y s, x s + y c), every product and sum rounded to fp32 (__fmul_rn / __fsub_rn / __fadd_rn:
//     no contraction into an FMA), then rounded once to the source dtype (RNE; NaN canonical);
//   * kFormat 0 writes the 16-bit row [k_nope | rotated k_pe]; 1 (per_tensor) e4m3(x / k_scale) of
//     both; 2 (ds_mla) [e4m3 nope in tiles of 128 | fp32 tile scales | rotated rope as bf16] — the
//     quantization exactly as fp8.cuh's quantizing write (its tile-scale rule kRule and its IEEE
//     arithmetic, reused here; per_tensor and 16-bit rows are built with kRule 0 only);
//   * q_out (when the call has a query) is [q_nope | rotated q_pe] in the source dtype, or
//     e4m3(x / q_scale) of both (the per_tensor rule).
//
// Work split: one warp per item. Items [0, n) are cache rows (token i), items [n, n + n * H) are
// query rows (token, head). A query row moves 1152 bytes each way (bf16, 512 + 64), so at H = 128 the
// query is ~99 % of the traffic; giving each (token, head) its own warp spreads it over every SM at
// any n, and at small n puts all of it in flight at once. Lane l holds the nope values as 16-byte
// chunks c = l + 32 i (8 values each) and rope values 2l, 2l + 1; in neox style the partner of a
// pair sits 16 lanes away (one __shfl_xor_sync). Loads of loc, position, sources and scales are
// issued together right behind the PDL wait; the cos/sin loads need the position (the one
// dependent round trip RoPE adds); the nope stores do not wait for them.
//
// Row selection: a cache row is written when loc >= 0, loc != skip_index, loc % dcp_world == dcp_rank
// (landing at loc / dcp_world) and the row is below num_slots; a token whose position lies outside
// [0, max_pos) reads no table row and writes nothing (neither its cache row nor its query rows; the
// Python side raises IndexError for it when bounds are checked). loc and positions are read at their
// strides, every row at its own stride, all offsets in 64 bits. With kUsePDL the kernel waits on the
// previous grid before reading inputs and triggers the next one at entry (kEarly) or after the wait.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>

#include <cstdint>

#include "fp8.cuh"
#include "row_args.cuh"

namespace mlakv {
namespace rope {

// Everything a launch needs, passed once as a __grid_constant__ block. Strides in bytes except
// loc_stride, pos_stride (elements) and cs_stride (floats).
struct RopeWriteArgs {
  uint8_t* kv;
  int64_t kv_stride, num_slots;
  const uint8_t* k_nope;
  int64_t k_nope_stride;
  const uint8_t* k_pe;
  int64_t k_pe_stride;
  const void* loc;
  int64_t loc_stride;
  const void* pos;
  int64_t pos_stride;
  const float* cs;
  int64_t cs_stride, max_pos;
  const float* k_scale;
  const uint8_t* q_nope;
  int64_t qn_s0, qn_s1;
  const uint8_t* q_pe;
  int64_t qp_s0, qp_s1;
  uint8_t* q_out;
  int64_t qo_s0, qo_s1;
  const float* q_scale;
  int64_t n, heads, n_items, skip_index, dcp_world, dcp_rank;
  int32_t loc_is_64, pos_is_64, q_fp8;
};

__device__ __forceinline__ int64_t load_index(const void* p, bool is64) {
  return is64 ? *static_cast<const int64_t*>(p) : static_cast<int64_t>(*static_cast<const int32_t*>(p));
}

__device__ __forceinline__ const void* index_addr(const void* base, int64_t i, int64_t stride, bool is64) {
  return static_cast<const uint8_t*>(base) + i * stride * (is64 ? 8 : 4);
}

// Two 16-bit source values (one 32-bit word, low half first) as fp32, exactly.
template <bool kBf16>
__device__ __forceinline__ float2 widen2(uint32_t w) {
  if constexpr (kBf16) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  } else {
    __half2 h;
    memcpy(&h, &w, 4);
    return __half22float2(h);
  }
}

// fp32 -> fp16 bits, RNE, NaN -> 0x7E00 (the reference's canonical NaN).
__device__ __forceinline__ uint32_t f16_bits(float x) {
  if (x != x) return 0x7e00u;
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(x)));
}

// fp32 -> the source dtype's bits (bf16 or fp16), RNE, canonical NaN.
template <bool kBf16>
__device__ __forceinline__ uint32_t round_bits(float x) {
  if constexpr (kBf16) {
    return fp8::bf16_bits(x);
  } else {
    return f16_bits(x);
  }
}

// The rotated rope values of this lane (elements 2 lane, 2 lane + 1 of a 64-value head), packed
// as two source-dtype values (low half first). w: this lane's two source values; cs_row: the
// position's table row. Every lane of the warp must call it (neox exchanges values across lanes).
template <bool kBf16, bool kNeox>
__device__ __forceinline__ uint32_t rotate_pair_word(uint32_t w, const float* cs_row, int lane) {
  const float2 v = widen2<kBf16>(w);
  float o0, o1;
  if constexpr (kNeox) {
    // Elements 2l, 2l + 1 (lanes 0-15: first half) pair with 2l + 32, 2l + 33 (lanes 16-31).
    const int j = 2 * (lane & 15);
    const float2 c = *reinterpret_cast<const float2*>(cs_row + j);
    const float2 s = *reinterpret_cast<const float2*>(cs_row + 32 + j);
    const float p0 = __shfl_xor_sync(0xffffffffu, v.x, 16);
    const float p1 = __shfl_xor_sync(0xffffffffu, v.y, 16);
    if (lane < 16) {  // x c - y s with x mine, y the partner's
      o0 = __fsub_rn(__fmul_rn(v.x, c.x), __fmul_rn(p0, s.x));
      o1 = __fsub_rn(__fmul_rn(v.y, c.y), __fmul_rn(p1, s.y));
    } else {  // x s + y c with x the partner's, y mine
      o0 = __fadd_rn(__fmul_rn(p0, s.x), __fmul_rn(v.x, c.x));
      o1 = __fadd_rn(__fmul_rn(p1, s.y), __fmul_rn(v.y, c.y));
    }
  } else {
    const float c = cs_row[lane];
    const float s = cs_row[32 + lane];
    o0 = __fsub_rn(__fmul_rn(v.x, c), __fmul_rn(v.y, s));
    o1 = __fadd_rn(__fmul_rn(v.x, s), __fmul_rn(v.y, c));
  }
  return round_bits<kBf16>(o0) | (round_bits<kBf16>(o1) << 16);
}

// Two rotated source-dtype values (a packed word) / d.s -> two e4m3 bytes (IEEE division, or the
// exact product by d.p for a power-of-two scale; RNE, saturating, NaN -> 0x7F).
template <bool kBf16>
__device__ __forceinline__ uint16_t quant_word(uint32_t w, const fp8::Divisor& d) {
  const float2 f = widen2<kBf16>(w);
  if (d.p != 0.0f) return static_cast<uint16_t>(fp8::e4m3x2(__fmul_rn(f.x, d.p), __fmul_rn(f.y, d.p)));
  return static_cast<uint16_t>(fp8::e4m3x2(fp8::div1(f.x, d), fp8::div1(f.y, d)));
}

// ---- one row's stores, shared by the cache row and the query row ------------------------------------
// v: this lane's 16-byte chunks of the row's nope (chunk lane + 32 i); pe: its two rope values; cs_row:
// the position's table row. Every lane of the warp must call the stores (neox exchanges values across
// lanes).

// v <- this lane's 16-byte chunks of the row's nope at src.
template <int kNope, int kNI>
__device__ __forceinline__ void load_nope16(const uint8_t* src, int lane, uint4 (&v)[kNI]) {
  constexpr int kNC = kNope / 8;
#pragma unroll
  for (int i = 0; i < kNI; ++i) {
    const int c = lane + 32 * i;
    if (c < kNC) v[i] = reinterpret_cast<const uint4*>(src)[c];
  }
}

// dst <- [nope | rotated rope] as 16-bit values.
template <bool kBf16, bool kNeox, int kNope, int kNI>
__device__ __forceinline__ void store_row16(uint8_t* dst, const uint4 (&v)[kNI], uint32_t pe, const float* cs_row,
                                            int lane) {
  constexpr int kNC = kNope / 8;
#pragma unroll
  for (int i = 0; i < kNI; ++i) {
    const int c = lane + 32 * i;
    if (c < kNC) reinterpret_cast<uint4*>(dst)[c] = v[i];
  }
  reinterpret_cast<uint32_t*>(dst + 2 * kNope)[lane] = rotate_pair_word<kBf16, kNeox>(pe, cs_row, lane);
}

// dst <- e4m3([nope | rotated rope] / d): the per_tensor rule.
template <bool kBf16, bool kNeox, int kNope, int kNI>
__device__ __forceinline__ void store_row_e4m3(uint8_t* dst, const uint4 (&v)[kNI], uint32_t pe, const float* cs_row,
                                               int lane, const fp8::Divisor& d) {
  constexpr int kNC = kNope / 8;
#pragma unroll
  for (int i = 0; i < kNI; ++i) {
    const int c = lane + 32 * i;
    if (c < kNC) {
      float f[8];
      widen8<kBf16>(v[i], f);
      reinterpret_cast<uint2*>(dst)[c] = fp8::quant8_e4m3(f, d);
    }
  }
  const uint32_t r = rotate_pair_word<kBf16, kNeox>(pe, cs_row, lane);
  reinterpret_cast<uint16_t*>(dst + kNope)[lane] = quant_word<kBf16>(r, d);
}

// ---- one cache row -----------------------------------------------------------------------------
template <int kFormat, int kRule, bool kBf16, int kNope, int kRope, bool kNeox, bool kUsePDL, bool kEarly>
__device__ __forceinline__ void cache_row(const RopeWriteArgs& a, int64_t t, int lane) {
  constexpr int kNC = kNope / 8;  // 16-byte source chunks of nope (8 values each)
  constexpr int kNI = (kNC + 31) / 32;
  const uint8_t* nsrc = a.k_nope + t * a.k_nope_stride;
  const uint32_t* psrc = reinterpret_cast<const uint32_t*>(a.k_pe + t * a.k_pe_stride);
  const void* lp = index_addr(a.loc, t, a.loc_stride, a.loc_is_64);
  const void* pp = index_addr(a.pos, t, a.pos_stride, a.pos_is_64);
  if constexpr (kUsePDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if constexpr (kUsePDL && !kEarly) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int64_t raw = load_index(lp, a.loc_is_64);
  const int64_t pos = load_index(pp, a.pos_is_64);
  uint4 v[kNI];
  load_nope16<kNope>(nsrc, lane, v);
  const uint32_t pe = psrc[lane];
  float k_scale = 1.0f;
  if constexpr (kFormat == 1) k_scale = *a.k_scale;

  int64_t row = raw;
  bool keep = raw >= 0 && raw != a.skip_index && pos >= 0 && pos < a.max_pos;
  if (a.dcp_world > 1) {
    row = raw / a.dcp_world;
    keep = keep && raw - row * a.dcp_world == a.dcp_rank;
  }
  if (!keep || row >= a.num_slots) return;  // uniform over the warp
  const float* cs_row = a.cs + pos * a.cs_stride;
  uint8_t* dst = a.kv + row * a.kv_stride;

  if constexpr (kFormat == 0) {
    store_row16<kBf16, kNeox, kNope>(dst, v, pe, cs_row, lane);
  } else if constexpr (kFormat == 1) {
    store_row_e4m3<kBf16, kNeox, kNope>(dst, v, pe, cs_row, lane, fp8::make_divisor(k_scale));
  } else {
    static_assert(kNope % 128 == 0, "ds_mla tiles are 128 values");
    constexpr int kTiles = kNope / 128;
    constexpr int kRopeOff = kNope + 4 * kTiles;
    // Tile amax (a tile = 16 chunks = 16 lanes of one i: a half-warp butterfly) and the tile scale by
    // the rule kRule, as fp8.cuh's quantizing write computes them (chunk_amax, tile_divisor,
    // quant8_tile: kRule 0's division needs no per-value range test once the scale is >= 2^-88 and
    // the chunk is finite).
    const fp8::Divisor e4m3_max = fp8::make_divisor(fp8::kE4M3Max);
    float f[kNI][8];
    fp8::Divisor scale[kNI];
    bool fast[kNI];
#pragma unroll
    for (int i = 0; i < kNI; ++i) {
      const int c = lane + 32 * i;
      float amax = 0.0f;
      fast[i] = true;
      if (c < kNC) {
        widen8<kBf16>(v[i], f[i]);
        amax = fp8::chunk_amax<kRule>(f[i], amax, fast[i]);
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      scale[i] = fp8::tile_divisor<kRule>(amax, e4m3_max);
    }
#pragma unroll
    for (int i = 0; i < kNI; ++i) {
      const int c = lane + 32 * i;
      if (c < kNC) {
        reinterpret_cast<uint2*>(dst)[c] = fp8::quant8_tile<kRule>(f[i], scale[i], fast[i]);
        if ((c & 15) == 0) *reinterpret_cast<float*>(dst + kNope + 4 * (c >> 4)) = scale[i].s;
      }
    }
    uint32_t r = rotate_pair_word<kBf16, kNeox>(pe, cs_row, lane);
    if constexpr (!kBf16) {  // the rotated fp16 values, rounded to bf16 (the ds_mla rope is bf16)
      const float2 h = widen2<false>(r);
      r = fp8::bf16_bits(h.x) | (fp8::bf16_bits(h.y) << 16);
    }
    reinterpret_cast<uint32_t*>(dst + kRopeOff)[lane] = r;
  }
}

// ---- one (token, head) row of the query ------------------------------------------------------------
template <bool kBf16, int kNope, int kRope, bool kNeox, bool kUsePDL, bool kEarly>
__device__ __forceinline__ void query_row(const RopeWriteArgs& a, int64_t item, int lane) {
  constexpr int kNC = kNope / 8;
  constexpr int kNI = (kNC + 31) / 32;
  // (token, head) of the item: a 32-bit division where it fits (a 64-bit one is a long emulated sequence
  // per warp), which is every call short of 2^32 query rows.
  int64_t t;
  if (item <= 0xffffffffll && a.heads <= 0xffffffffll) {
    t = static_cast<uint32_t>(item) / static_cast<uint32_t>(a.heads);
  } else {
    t = item / a.heads;
  }
  const int64_t h = item - t * a.heads;
  const uint8_t* nsrc = a.q_nope + t * a.qn_s0 + h * a.qn_s1;
  const uint32_t* psrc = reinterpret_cast<const uint32_t*>(a.q_pe + t * a.qp_s0 + h * a.qp_s1);
  uint8_t* dst = a.q_out + t * a.qo_s0 + h * a.qo_s1;
  const void* pp = index_addr(a.pos, t, a.pos_stride, a.pos_is_64);
  if constexpr (kUsePDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if constexpr (kUsePDL && !kEarly) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int64_t pos = load_index(pp, a.pos_is_64);
  uint4 v[kNI];
  load_nope16<kNope>(nsrc, lane, v);
  const uint32_t pe = psrc[lane];
  const bool fp8_out = a.q_fp8 != 0;
  const float q_scale = fp8_out ? *a.q_scale : 1.0f;
  if (pos < 0 || pos >= a.max_pos) return;  // uniform over the warp
  const float* cs_row = a.cs + pos * a.cs_stride;
  if (!fp8_out) {
    store_row16<kBf16, kNeox, kNope>(dst, v, pe, cs_row, lane);
  } else {
    store_row_e4m3<kBf16, kNeox, kNope>(dst, v, pe, cs_row, lane, fp8::make_divisor(q_scale));
  }
}

template <int kFormat, int kRule, bool kBf16, int kNope, int kRope, bool kNeox, bool kUsePDL, bool kEarly>
__global__ void rope_write_kernel(const __grid_constant__ RopeWriteArgs a) {
  static_assert(kRope == 64, "one rope head is 64 values: two per lane");
  static_assert(kNope % 8 == 0, "nope is whole 16-byte chunks");
  const int lane = threadIdx.x;  // blockDim = (32, warps)
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if constexpr (kUsePDL && kEarly) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (item >= a.n_items) return;  // uniform over the warp: no item, nothing to wait for
  if (item < a.n) {
    cache_row<kFormat, kRule, kBf16, kNope, kRope, kNeox, kUsePDL, kEarly>(a, item, lane);
  } else {
    query_row<kBf16, kNope, kRope, kNeox, kUsePDL, kEarly>(a, item - a.n, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side. The launcher does not trust its caller: every fact the kernel's memory safety rests on
// is checked here (TypeError/ValueError, never a fault). It returns false, launching nothing, when
// the call is valid but its addresses or strides do not suit the kernel's vectors (kv rows, nope
// rows and q_out rows on 16 bytes — q_out on 8 when it is e4m3 — rope rows on 4, the cos/sin rows
// on 8): the caller falls back to Triton.
// ---------------------------------------------------------------------------------------------
inline bool is_index(const DLDataType& d) { return d.code == kDLInt && (d.bits == 32 || d.bits == 64) && d.lanes == 1; }
inline bool is_src(const DLDataType& d, bool bf16) {
  return d.lanes == 1 && d.bits == 16 && d.code == (bf16 ? kDLBfloat : kDLFloat);
}
inline bool is_f32(const DLDataType& d) { return d.code == kDLFloat && d.bits == 32 && d.lanes == 1; }

// Row bytes of the cache format: 16-bit rows, per_tensor, ds_mla.
template <int kFormat, int kNope, int kRope>
constexpr int64_t cache_row_bytes() {
  return kFormat == 0 ? 2 * (kNope + kRope) : kFormat == 1 ? kNope + kRope : kNope + 4 * (kNope / 128) + 2 * kRope;
}

// kv: [num_slots, (1,) row]: kBf16's dtype (kFormat 0) or 8-bit; loc, positions: [n] int32/int64,
// any stride; k_nope: [n, (1,) kNope], k_pe: [n, (1,) kRope] (kBf16 ? bf16 : fp16);
// cos_sin: [max_pos, kRope] float32; k_scale: fp32 >= 1 element (read by kFormat 1 only).
// has_q: q_nope [n, H, kNope], q_pe [n, H, kRope] (the sources' dtype), q_out [n, H, kNope + kRope]
// of that dtype or 8-bit (then q_scale, fp32 >= 1 element); without a query they are not looked at.
// Raises for invalid arguments; returns whether the alignment suits the kernel.
template <int kFormat, bool kBf16, int kNope, int kRope>
bool check_rope_write(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView k_nope,
                      tvm::ffi::TensorView k_pe, tvm::ffi::TensorView positions, tvm::ffi::TensorView cos_sin,
                      tvm::ffi::TensorView k_scale, bool has_q, tvm::ffi::TensorView q_nope, tvm::ffi::TensorView q_pe,
                      tvm::ffi::TensorView q_out, tvm::ffi::TensorView q_scale, int64_t dcp_world, int64_t dcp_rank) {
  const auto rows_ok = [](const tvm::ffi::TensorView& t) {
    return (t.ndim() == 2 || (t.ndim() == 3 && t.size(1) == 1)) && (t.size(-1) <= 1 || t.stride(-1) == 1);
  };
  TVM_FFI_CHECK(rows_ok(kv) && rows_ok(k_nope) && rows_ok(k_pe), ValueError)
      << "kv_buffer/k_nope/k_pe must be 2-D [n, d] or 3-D [n, 1, d] with a contiguous last dim";
  TVM_FFI_CHECK(loc.ndim() == 1 && positions.ndim() == 1, ValueError) << "loc and positions must be 1-D [n]";
  TVM_FFI_CHECK(is_index(loc.dtype()) && is_index(positions.dtype()), TypeError)
      << "loc and positions must be int32 or int64";
  const DLDevice dev = kv.device();
  const auto on_dev = [&dev](const tvm::ffi::TensorView& t) {
    return t.device().device_type == dev.device_type && t.device().device_id == dev.device_id;
  };
  TVM_FFI_CHECK(on_dev(loc) && on_dev(k_nope) && on_dev(k_pe) && on_dev(positions) && on_dev(cos_sin) &&
                    (kFormat != 1 || on_dev(k_scale)),
                ValueError)
      << "kv_buffer, loc, k_nope, k_pe, positions, cos_sin_cache (and k_scale) must be on one device";
  const int64_t n = loc.size(0);
  TVM_FFI_CHECK(k_nope.size(0) == n && k_pe.size(0) == n && positions.size(0) == n, ValueError)
      << "k_nope/k_pe/positions: dim 0 must equal n=" << n;
  TVM_FFI_CHECK(is_src(k_nope.dtype(), kBf16) && is_src(k_pe.dtype(), kBf16), TypeError)
      << "this module was built for " << (kBf16 ? "bfloat16" : "float16") << " k_nope/k_pe";
  TVM_FFI_CHECK(k_nope.size(-1) == kNope && k_pe.size(-1) == kRope, ValueError)
      << "this module was built for " << kNope << " + " << kRope << " values, got " << k_nope.size(-1) << " + "
      << k_pe.size(-1);
  if constexpr (kFormat == 0) {
    TVM_FFI_CHECK(is_src(kv.dtype(), kBf16), TypeError) << "kv_buffer must have the sources' dtype (16-bit rows)";
  } else {
    TVM_FFI_CHECK(kv.dtype().bits == 8 && kv.dtype().lanes == 1, TypeError) << "kv_buffer must hold bytes (8-bit)";
  }
  constexpr int64_t kRowBytes = cache_row_bytes<kFormat, kNope, kRope>();
  TVM_FFI_CHECK(kv.size(-1) * elem_bytes(kv) >= kRowBytes, ValueError)
      << "kv_buffer: last dim holds " << kv.size(-1) * elem_bytes(kv) << " bytes, the row needs " << kRowBytes;
  TVM_FFI_CHECK(kv.size(0) <= 1 || kv.stride(0) >= kv.size(-1), ValueError) << "kv_buffer: rows overlap";
  TVM_FFI_CHECK(cos_sin.ndim() == 2 && is_f32(cos_sin.dtype()) && cos_sin.size(1) == kRope &&
                    (cos_sin.size(1) <= 1 || cos_sin.stride(1) == 1),
                ValueError)
      << "cos_sin_cache must be float32 [max_pos, " << kRope << "] with a contiguous last dim";
  if constexpr (kFormat == 1) {
    TVM_FFI_CHECK(is_f32(k_scale.dtype()) && k_scale.numel() >= 1, TypeError) << "k_scale must be 1-element float32";
  }
  TVM_FFI_CHECK(dcp_world >= 1 && dcp_rank >= 0 && dcp_rank < dcp_world, ValueError)
      << "dcp_rank=" << dcp_rank << " must lie in [0, dcp_world_size=" << dcp_world << ")";
  const auto mis = [](const tvm::ffi::TensorView& t, int64_t vec, int dims) {
    uintptr_t bits = reinterpret_cast<uintptr_t>(tensor_address(t));
    for (int d = 0; d < dims; ++d) bits |= static_cast<uintptr_t>(t.stride(d) * elem_bytes(t));
    return (bits % vec) != 0;
  };
  bool aligned = !(mis(kv, 16, 1) || mis(k_nope, 16, 1) || mis(k_pe, 4, 1) || mis(cos_sin, 8, 1));
  if (has_q) {
    TVM_FFI_CHECK(q_nope.ndim() == 3 && q_pe.ndim() == 3 && q_out.ndim() == 3, ValueError)
        << "q_nope/q_pe/q_out must be 3-D [n, H, d]";
    const int64_t heads = q_nope.size(1);
    TVM_FFI_CHECK(q_nope.size(0) == n && q_pe.size(0) == n && q_out.size(0) == n && q_pe.size(1) == heads &&
                      q_out.size(1) == heads && heads >= 1,
                  ValueError)
        << "q_nope/q_pe/q_out must be [n=" << n << ", H, d] with one H >= 1";
    TVM_FFI_CHECK(q_nope.size(2) == kNope && q_pe.size(2) == kRope && q_out.size(2) == kNope + kRope, ValueError)
        << "q_nope/q_pe/q_out last dims must be " << kNope << ", " << kRope << ", " << kNope + kRope;
    TVM_FFI_CHECK(q_nope.stride(2) == 1 && q_pe.stride(2) == 1 && q_out.stride(2) == 1, ValueError)
        << "q_nope/q_pe/q_out: the last dim must be contiguous";
    TVM_FFI_CHECK(is_src(q_nope.dtype(), kBf16) && is_src(q_pe.dtype(), kBf16), TypeError)
        << "q_nope/q_pe must have k_nope's dtype";
    const bool q8 = q_out.dtype().bits == 8 && q_out.dtype().lanes == 1;
    TVM_FFI_CHECK(q8 || is_src(q_out.dtype(), kBf16), TypeError) << "q_out must have q_nope's dtype or be 8-bit (e4m3)";
    TVM_FFI_CHECK(on_dev(q_nope) && on_dev(q_pe) && on_dev(q_out) && (!q8 || on_dev(q_scale)), ValueError)
        << "q_nope, q_pe, q_out (and q_scale) must be on kv_buffer's device";
    if (q8) {
      TVM_FFI_CHECK(is_f32(q_scale.dtype()) && q_scale.numel() >= 1, TypeError) << "q_scale must be 1-element float32";
    }
    aligned = aligned && !(mis(q_nope, 16, 2) || mis(q_pe, 4, 2) || mis(q_out, q8 ? 8 : 16, 2));
  }
  return aligned;
}

template <int kFormat, int kRule, bool kBf16, int kNope, int kRope, bool kUsePDL, bool kNeox, bool kEarly>
void launch_typed(const RopeWriteArgs& a, int num_warps, cudaStream_t stream) {
  const int64_t blocks = (a.n_items + num_warps - 1) / num_warps;
  TVM_FFI_CHECK(blocks <= 0x7fffffff, ValueError) << a.n_items << " rows need too many blocks";
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t cfg = launch_config(dim3(static_cast<unsigned>(blocks)),
                                               dim3(32, static_cast<unsigned>(num_warps)), 0, stream, kUsePDL, attr);
  TVM_FFI_CHECK_CUDA_ERROR(
      cudaLaunchKernelEx(&cfg, rope_write_kernel<kFormat, kRule, kBf16, kNope, kRope, kNeox, kUsePDL, kEarly>, a));
}

// One tile-scale rule's kernels for the RoPE style and the PDL trigger's place.
template <int kFormat, int kRule, bool kBf16, int kNope, int kRope, bool kUsePDL>
void launch_rule(const RopeWriteArgs& a, bool is_neox, bool early_trigger, int num_warps, cudaStream_t stream) {
  if (is_neox) {
    if (early_trigger) launch_typed<kFormat, kRule, kBf16, kNope, kRope, kUsePDL, true, true>(a, num_warps, stream);
    else launch_typed<kFormat, kRule, kBf16, kNope, kRope, kUsePDL, true, false>(a, num_warps, stream);
  } else {
    if (early_trigger) launch_typed<kFormat, kRule, kBf16, kNope, kRope, kUsePDL, false, true>(a, num_warps, stream);
    else launch_typed<kFormat, kRule, kBf16, kNope, kRope, kUsePDL, false, false>(a, num_warps, stream);
  }
}

// The checks above, then one launch on the current stream. skip_index: a slot skipped like padding
// (-1: none); num_warps: warps (items) per CTA in [1, 32]; early_trigger: the PDL trigger at entry;
// scale_rule: ds_mla's tile-scale rule code (0 fp32_floor, 1 fp32, 2 ue8m0; other formats ignore it).
// Returns false, launching nothing, when the alignment does not suit the kernel; n == 0 returns true
// after the checks, launching nothing.
template <int kFormat, bool kBf16, int kNope, int kRope, bool kUsePDL>
bool launch_rope_write(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView k_nope,
                       tvm::ffi::TensorView k_pe, tvm::ffi::TensorView positions, tvm::ffi::TensorView cos_sin,
                       tvm::ffi::TensorView k_scale, bool has_q, tvm::ffi::TensorView q_nope,
                       tvm::ffi::TensorView q_pe, tvm::ffi::TensorView q_out, tvm::ffi::TensorView q_scale,
                       bool is_neox, int64_t skip_index, int64_t dcp_world, int64_t dcp_rank, int64_t num_warps,
                       bool early_trigger, int64_t scale_rule) {
  const bool aligned = check_rope_write<kFormat, kBf16, kNope, kRope>(kv, loc, k_nope, k_pe, positions, cos_sin,
                                                                     k_scale, has_q, q_nope, q_pe, q_out, q_scale,
                                                                     dcp_world, dcp_rank);
  TVM_FFI_CHECK(kv.device().device_type == kDLCUDA, ValueError) << "kv_buffer must be a CUDA tensor";
  TVM_FFI_CHECK(num_warps >= 1 && num_warps <= 32, ValueError) << "num_warps must be in [1, 32], got " << num_warps;
  TVM_FFI_CHECK(scale_rule >= fp8::kRuleFp32Floor && scale_rule <= fp8::kRuleUe8m0, ValueError)
      << "scale_rule must be 0 (fp32_floor), 1 (fp32) or 2 (ue8m0), got " << scale_rule;
  if (!aligned) return false;
  const int64_t n = loc.size(0);
  if (n == 0) return true;
  RopeWriteArgs a{};
  a.kv = tensor_address(kv);
  a.kv_stride = kv.stride(0) * elem_bytes(kv);
  a.num_slots = kv.size(0);
  a.k_nope = tensor_address(k_nope);
  a.k_nope_stride = k_nope.stride(0) * 2;
  a.k_pe = tensor_address(k_pe);
  a.k_pe_stride = k_pe.stride(0) * 2;
  a.loc = tensor_address(loc);
  a.loc_stride = loc.stride(0);
  a.loc_is_64 = loc.dtype().bits == 64;
  a.pos = tensor_address(positions);
  a.pos_stride = positions.stride(0);
  a.pos_is_64 = positions.dtype().bits == 64;
  a.cs = reinterpret_cast<const float*>(tensor_address(cos_sin));
  a.cs_stride = cos_sin.stride(0);
  a.max_pos = cos_sin.size(0);
  a.k_scale = reinterpret_cast<const float*>(tensor_address(k_scale));
  a.n = n;
  a.heads = 1;
  a.n_items = n;
  a.skip_index = skip_index < 0 ? -1 : skip_index;
  a.dcp_world = dcp_world;
  a.dcp_rank = dcp_rank;
  if (has_q) {
    a.q_nope = tensor_address(q_nope);
    a.qn_s0 = q_nope.stride(0) * 2;
    a.qn_s1 = q_nope.stride(1) * 2;
    a.q_pe = tensor_address(q_pe);
    a.qp_s0 = q_pe.stride(0) * 2;
    a.qp_s1 = q_pe.stride(1) * 2;
    a.q_out = tensor_address(q_out);
    a.qo_s0 = q_out.stride(0) * elem_bytes(q_out);
    a.qo_s1 = q_out.stride(1) * elem_bytes(q_out);
    a.q_fp8 = q_out.dtype().bits == 8;
    a.q_scale = reinterpret_cast<const float*>(tensor_address(q_scale));
    a.heads = q_nope.size(1);
    a.n_items = n + n * a.heads;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, kv.device().device_id));
  const int w = static_cast<int>(num_warps);
  if constexpr (kFormat != 2) {  // only ds_mla has tile scales
    launch_rule<kFormat, fp8::kRuleFp32Floor, kBf16, kNope, kRope, kUsePDL>(a, is_neox, early_trigger, w, stream);
  } else if (scale_rule == fp8::kRuleFp32Floor) {
    launch_rule<kFormat, fp8::kRuleFp32Floor, kBf16, kNope, kRope, kUsePDL>(a, is_neox, early_trigger, w, stream);
  } else if (scale_rule == fp8::kRuleFp32) {
    launch_rule<kFormat, fp8::kRuleFp32, kBf16, kNope, kRope, kUsePDL>(a, is_neox, early_trigger, w, stream);
  } else {
    launch_rule<kFormat, fp8::kRuleUe8m0, kBf16, kNope, kRope, kUsePDL>(a, is_neox, early_trigger, w, stream);
  }
  return true;
}

}  // namespace rope
}  // namespace mlakv
