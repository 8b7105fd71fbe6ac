// CPU emulation of one Metal compute dispatch, for the MSL subset tilewise's kernel bodies use
// (metal_source.py). Included first by the generated translation unit (see __init__.py), before
// msl_shim.h turns `device` / `constant` / `thread` into C++ spellings.
//
// Execution model (why it is trustworthy for the bodies' logic):
// - The grid counts threads, as MLX's dispatchThreads does; edge threadgroups are partial.
// - Every thread of a threadgroup is its own fiber (ucontext) with its own stack and registers, so
//   each thread runs the body exactly as written. A fiber runs until it reaches a synchronisation
//   point (threadgroup_barrier, simd_sum) or returns; then the scheduler runs the next one.
// - threadgroup_barrier releases only when EVERY thread of the group waits at the same barrier;
//   a thread that returned, or waits at another barrier, is reported as an error (divergent barrier).
// - simd_sum releases when every lane of that simdgroup (32 consecutive threads) waits at the same
//   simd_sum; the lanes exchange their values and each gets the sum (lane order, float adds).
// - The whole grid runs once per schedule (forward, reverse, shuffled-per-round thread order); the
//   outputs must be bit-identical, so a result that depends on thread order (a data race, e.g. a
//   missing barrier) is an error even when one order happens to give the right numbers.
// - Input, output and threadgroup buffers end at a page boundary followed by an inaccessible guard
//   page (an overrun faults and is reported), and the slack before them plus all threadgroup memory
//   at the start of every threadgroup is filled with 0xFF bytes (NaN in float, half and bfloat16),
//   so a read of unwritten or out-of-range memory poisons the result.
// - Threadgroup memory over Apple's 32 KiB, or a threadgroup over 1024 threads, is an error.
#pragma once

// Only declarations here (no standard library), so each kernel's translation unit compiles fast; the
// dispatch itself lives in runtime.cpp.
namespace tw {

struct uint3 {
  unsigned int x, y, z;
};

// What the fiber of one thread sees: the Metal attributes MLX may declare.
struct ThreadPos {
  uint3 threadgroup_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 thread_position_in_grid;
  uint3 threads_per_threadgroup;  // this (possibly partial) threadgroup's size
  uint3 dispatch_threads_per_threadgroup;
  uint3 threads_per_grid;
  uint3 threadgroups_per_grid;
  unsigned int thread_index_in_threadgroup;
  unsigned int simdgroup_index_in_threadgroup;
  unsigned int thread_index_in_simdgroup;
  unsigned int simdgroups_per_threadgroup;
  unsigned int threads_per_simdgroup;
  unsigned int thread_execution_width;
};

using InvokeFn = void (*)(const ThreadPos&);

void* threadgroup_alloc(unsigned long bytes, unsigned long align, int line);
void barrier(unsigned flags, unsigned threadgroup_flag, int line);
float simd_sum(float v, int line);
const void* input_data(int i);
const int* input_shape(int i);
void* output_data();
// argv: <input file> <output file> <schedules, comma separated: fwd,rev,shuffle>
int run_main(int argc, char** argv, InvokeFn invoke, int expected_inputs);

}  // namespace tw
