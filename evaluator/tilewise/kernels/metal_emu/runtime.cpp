// Implementation of runtime.h: compiled once (cached) and linked with every emulated kernel.
#include "runtime.h"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

namespace tw {

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "TW_EMU_ERROR: %s\n", msg.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

size_t page_size() {
  static size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

// `bytes` ending exactly at a page boundary followed by a PROT_NONE page; one PROT_NONE page before
// the first page too. The slack between the first page's start and the data is poisoned (0xFF).
struct Guarded {
  char* base = nullptr;
  size_t map_len = 0;
  char* data = nullptr;
  size_t bytes = 0;

  void allocate(size_t n) {
    const size_t ps = page_size();
    const size_t pages = (n + ps - 1) / ps + (n == 0 ? 1 : 0);
    map_len = (pages + 2) * ps;
    void* m = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail("mmap failed");
    base = static_cast<char*>(m);
    if (mprotect(base + ps, pages * ps, PROT_READ | PROT_WRITE) != 0) fail("mprotect failed");
    bytes = n;
    data = base + ps + pages * ps - n;
    std::memset(base + ps, 0xFF, pages * ps - n);
  }
  void poison_all() { std::memset(base + page_size(), 0xFF, map_len - 2 * page_size()); }
};

struct Input {
  std::vector<int> shape;
  Guarded buf;
};

struct Launch {
  uint3 grid{1, 1, 1}, tg{1, 1, 1};
  std::vector<Input> inputs;
  Guarded out;
  std::vector<char> out_init;
};

static Launch g;  // the dispatch being emulated (one per process)


constexpr unsigned SIMD = 32;
constexpr unsigned MAX_THREADS = 1024;
constexpr size_t THREADGROUP_MEMORY_LIMIT = 32 * 1024;  // Apple GPUs' maxThreadgroupMemoryLength
constexpr size_t STACK = 256 * 1024;

enum class St { Ready, Barrier, Simd, Done };

struct Fiber {
  ucontext_t ctx;
  ThreadPos pos;
  St st = St::Ready;
  int line = 0;  // source line of the barrier / simd_sum it waits at
  float simd_in = 0, simd_out = 0;
  size_t tg_calls = 0;  // threadgroup declarations executed so far
};

struct TgSlot {
  Guarded mem;
  size_t bytes;
  int line;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  ucontext_t main_ctx;
  Fiber* cur = nullptr;
  InvokeFn invoke = nullptr;
  std::vector<TgSlot> tg;  // threadgroup arrays, same layout for every threadgroup
  size_t tg_total = 0;
  uint64_t rng = 0;
  std::string mode;

  uint64_t next_rand() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  }
};

static Scheduler S;

void fiber_entry() {
  Fiber* f = S.cur;
  S.invoke(f->pos);
  f->st = St::Done;  // returning resumes main_ctx through uc_link
}

void yield() { swapcontext(&S.cur->ctx, &S.main_ctx); }

// ---- called by the shim (kernel side) ----

void* threadgroup_alloc(unsigned long bytes, unsigned long align, int line) {
  Fiber* f = S.cur;
  const size_t k = f->tg_calls++;
  if (k == S.tg.size()) {
    S.tg_total += bytes;
    if (S.tg_total > THREADGROUP_MEMORY_LIMIT)
      fail("threadgroup memory " + std::to_string(S.tg_total) + " bytes > 32 KiB (Apple limit)");
    S.tg.push_back(TgSlot{{}, bytes, line});
    S.tg.back().mem.allocate(bytes);
    S.tg.back().mem.poison_all();
  }
  TgSlot& s = S.tg[k];
  if (s.bytes != bytes || s.line != line)
    fail("threads declared different threadgroup arrays (line " + std::to_string(line) + ")");
  if (reinterpret_cast<uintptr_t>(s.mem.data) % align != 0) fail("threadgroup array misaligned");
  return s.mem.data;
}

void barrier(unsigned flags, unsigned threadgroup_flag, int line) {
  if (!(flags & threadgroup_flag))
    fail("threadgroup_barrier at line " + std::to_string(line) +
         " without mem_flags::mem_threadgroup does not order threadgroup memory");
  S.cur->st = St::Barrier;
  S.cur->line = line;
  yield();
}

float simd_sum(float v, int line) {
  S.cur->simd_in = v;
  S.cur->st = St::Simd;
  S.cur->line = line;
  yield();
  return S.cur->simd_out;
}

// ---- scheduler (host side) ----

std::string where(const Fiber& f) {
  return "thread " + std::to_string(f.pos.thread_index_in_threadgroup) + " of threadgroup (" +
         std::to_string(f.pos.threadgroup_position_in_grid.x) + "," +
         std::to_string(f.pos.threadgroup_position_in_grid.y) + "," +
         std::to_string(f.pos.threadgroup_position_in_grid.z) + ")";
}

void run_group(uint3 gid, uint3 size) {
  const unsigned n = size.x * size.y * size.z;
  const Launch& L = g;
  S.fibers.assign(n, Fiber{});
  for (auto& s : S.tg) s.mem.poison_all();
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = S.fibers[i];
    ThreadPos& p = f.pos;
    const unsigned lx = i % size.x, ly = (i / size.x) % size.y, lz = i / (size.x * size.y);
    p.threadgroup_position_in_grid = gid;
    p.thread_position_in_threadgroup = {lx, ly, lz};
    p.thread_position_in_grid = {gid.x * L.tg.x + lx, gid.y * L.tg.y + ly, gid.z * L.tg.z + lz};
    p.threads_per_threadgroup = size;
    p.dispatch_threads_per_threadgroup = L.tg;
    p.threads_per_grid = L.grid;
    p.threadgroups_per_grid = {(L.grid.x + L.tg.x - 1) / L.tg.x, (L.grid.y + L.tg.y - 1) / L.tg.y,
                               (L.grid.z + L.tg.z - 1) / L.tg.z};
    p.thread_index_in_threadgroup = i;
    p.simdgroup_index_in_threadgroup = i / SIMD;
    p.thread_index_in_simdgroup = i % SIMD;
    p.simdgroups_per_threadgroup = (n + SIMD - 1) / SIMD;
    p.threads_per_simdgroup = SIMD;
    p.thread_execution_width = SIMD;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = S.stacks + size_t(i) * STACK;
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = &S.main_ctx;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<unsigned> order(n);
  for (;;) {
    for (unsigned i = 0; i < n; ++i) order[i] = (S.mode == "rev") ? n - 1 - i : i;
    if (S.mode == "shuffle")
      for (unsigned i = n; i > 1; --i) std::swap(order[i - 1], order[S.next_rand() % i]);
    bool ran = false;
    for (unsigned i : order) {
      Fiber& f = S.fibers[i];
      if (f.st != St::Ready) continue;
      S.cur = &f;
      swapcontext(&S.main_ctx, &f.ctx);
      ran = true;
    }
    bool released = false;
    // simd_sum: every lane of a simdgroup at the same simd_sum.
    for (unsigned s0 = 0; s0 < n; s0 += SIMD) {
      const unsigned s1 = std::min(n, s0 + SIMD);
      bool all = true;
      for (unsigned i = s0; i < s1; ++i)
        all = all && S.fibers[i].st == St::Simd && S.fibers[i].line == S.fibers[s0].line;
      if (!all) continue;
      float sum = 0.0f;
      for (unsigned i = s0; i < s1; ++i) sum += S.fibers[i].simd_in;
      for (unsigned i = s0; i < s1; ++i) {
        S.fibers[i].simd_out = sum;
        S.fibers[i].st = St::Ready;
      }
      released = true;
    }
    // threadgroup_barrier: every thread of the group at the same barrier.
    unsigned at_barrier = 0, done = 0;
    for (auto& f : S.fibers) {
      at_barrier += f.st == St::Barrier;
      done += f.st == St::Done;
    }
    if (done == n) return;
    if (at_barrier == n) {
      for (auto& f : S.fibers)
        if (f.line != S.fibers[0].line)
          fail("threads wait at different threadgroup_barriers (lines " + std::to_string(f.line) + " and " +
               std::to_string(S.fibers[0].line) + ")");
      for (auto& f : S.fibers) f.st = St::Ready;
      released = true;
    }
    if (!ran && !released) {
      std::string msg = "deadlock (divergent barrier or simd_sum):";
      for (auto& f : S.fibers) {
        if (f.st == St::Done && done < n && at_barrier > 0) {
          msg += " " + where(f) + " returned while others wait at threadgroup_barrier line " +
                 std::to_string([&] { for (auto& q : S.fibers) if (q.st == St::Barrier) return q.line; return 0; }());
          break;
        }
        if (f.st == St::Simd) {
          msg += " " + where(f) + " waits at simd_sum line " + std::to_string(f.line) +
                 " where not all of its simdgroup's lanes arrived;";
          break;
        }
        if (f.st == St::Barrier) {
          msg += " " + where(f) + " waits at threadgroup_barrier line " + std::to_string(f.line) + ";";
          break;
        }
      }
      fail(msg);
    }
  }
}

void run_grid() {
  const Launch& L = g;
  const unsigned ng[3] = {(L.grid.x + L.tg.x - 1) / L.tg.x, (L.grid.y + L.tg.y - 1) / L.tg.y,
                          (L.grid.z + L.tg.z - 1) / L.tg.z};
  for (unsigned z = 0; z < ng[2]; ++z)
    for (unsigned y = 0; y < ng[1]; ++y)
      for (unsigned x = 0; x < ng[0]; ++x) {
        // dispatchThreads: the threadgroups at the grid's far edges hold only the remaining threads.
        const uint3 size{std::min(L.tg.x, L.grid.x - x * L.tg.x), std::min(L.tg.y, L.grid.y - y * L.tg.y),
                         std::min(L.tg.z, L.grid.z - z * L.tg.z)};
        run_group({x, y, z}, size);
      }
}

void on_segv(int, siginfo_t* si, void*) {
  char buf[160];
  int k = std::snprintf(buf, sizeof buf,
                        "TW_EMU_ERROR: out-of-bounds memory access at %p (a guard page after/before a buffer)\n",
                        si->si_addr);
  if (write(2, buf, size_t(k)) < 0) {
  }
  _exit(4);
}

// File layout (little-endian int64 unless said): grid[3], threadgroup[3], n_inputs, per input: ndim,
// shape[ndim], nbytes, bytes; then output nbytes, bytes (its initial content, e.g. NaN poison).
int64_t rd(FILE* f) {
  int64_t v;
  if (std::fread(&v, 8, 1, f) != 1) fail("truncated input file");
  return v;
}

// argv: <input file> <output file> <schedules, comma separated: fwd,rev,shuffle>
int run_main(int argc, char** argv, InvokeFn invoke, int expected_inputs) {
  if (argc != 4) fail("usage: kernel IN OUT SCHEDULES");
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) fail(std::string("cannot open ") + argv[1]);
  int64_t v[6];
  for (auto& x : v) x = rd(f);
  g.grid = {unsigned(v[0]), unsigned(v[1]), unsigned(v[2])};
  g.tg = {unsigned(v[3]), unsigned(v[4]), unsigned(v[5])};
  // MLX: group_dims = min(threadgroup, grid) per axis; it refuses groups over the pipeline's limit.
  g.tg = {std::min(g.tg.x, g.grid.x), std::min(g.tg.y, g.grid.y), std::min(g.tg.z, g.grid.z)};
  if (g.tg.x * g.tg.y * g.tg.z > MAX_THREADS) fail("threadgroup over 1024 threads");
  if (!g.tg.x || !g.tg.y || !g.tg.z) fail("empty threadgroup");
  const int64_t nin = rd(f);
  if (nin != expected_inputs) fail("input count differs from the kernel signature");
  g.inputs.resize(size_t(nin));
  for (auto& in : g.inputs) {
    const int64_t nd = rd(f);
    for (int64_t d = 0; d < nd; ++d) in.shape.push_back(int(rd(f)));
    const int64_t nb = rd(f);
    in.buf.allocate(size_t(nb));
    if (nb && std::fread(in.buf.data, 1, size_t(nb), f) != size_t(nb)) fail("truncated input data");
  }
  const int64_t ob = rd(f);
  g.out_init.resize(size_t(ob));
  if (ob && std::fread(g.out_init.data(), 1, size_t(ob), f) != size_t(ob)) fail("truncated output data");
  std::fclose(f);
  g.out.allocate(size_t(ob));

  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  static char altstack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);

  void* st = mmap(nullptr, STACK * MAX_THREADS, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (st == MAP_FAILED) fail("cannot map fiber stacks");
  S.stacks = static_cast<char*>(st);
  S.invoke = invoke;

  std::vector<char> first;
  std::string first_mode;
  std::string schedules = argv[3];
  size_t pos = 0;
  while (pos <= schedules.size()) {
    size_t e = schedules.find(',', pos);
    if (e == std::string::npos) e = schedules.size();
    S.mode = schedules.substr(pos, e - pos);
    pos = e + 1;
    if (S.mode != "fwd" && S.mode != "rev" && S.mode != "shuffle") fail("unknown schedule " + S.mode);
    S.rng = 0x9E3779B97F4A7C15ull;
    if (ob) std::memcpy(g.out.data, g.out_init.data(), size_t(ob));
    run_grid();
    std::vector<char> res(g.out.data, g.out.data + ob);
    if (first_mode.empty()) {
      first = res;
      first_mode = S.mode;
    } else if (res != first) {
      size_t i = 0;
      while (i < res.size() && res[i] == first[i]) ++i;
      fail("result depends on thread order (data race): schedules " + first_mode + " and " + S.mode +
           " differ first at output byte " + std::to_string(i));
    }
  }
  FILE* o = std::fopen(argv[2], "wb");
  if (!o || (ob && std::fwrite(first.data(), 1, size_t(ob), o) != size_t(ob))) fail("cannot write output");
  std::fclose(o);
  return 0;
}

const void* input_data(int i) { return g.inputs[size_t(i)].buf.data; }
const int* input_shape(int i) { return g.inputs[size_t(i)].shape.data(); }
void* output_data() { return g.out.data; }

}  // namespace tw
