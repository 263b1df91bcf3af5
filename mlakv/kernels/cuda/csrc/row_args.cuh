// What the row kernels share (the plain write in set_mla_kv_buffer.cuh, the quantizing write in
// mla_fp8.cuh): the argument block they take as one __grid_constant__ struct, and the launch
// configuration with programmatic dependent launch (PDL).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mlakv {

// A row kernel's arguments, gathered once by the launcher (strides in bytes except loc_stride).
// A row i is written to slot loc[i * loc_stride] unless that is negative, equal to skip_index
// (-1: none) or past num_slots; with dcp_world > 1 only slots of this rank (loc % dcp_world ==
// dcp_rank, landing at loc / dcp_world) are written.
struct RowArgs {
  uint8_t* kv;
  int64_t kv_stride, num_slots;
  const uint8_t* nope;
  int64_t nope_stride;
  const uint8_t* rope;
  int64_t rope_stride;
  const void* loc;
  int64_t loc_stride, n_loc, skip_index, dcp_world, dcp_rank;
};

// A launch configuration on `stream`, with programmatic stream serialization (PDL) when `pdl`;
// `attr` (one element) must outlive the launch call.
inline cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                                        cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

}  // namespace mlakv
