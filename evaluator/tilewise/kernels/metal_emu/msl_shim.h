// The MSL subset tilewise's Metal kernel bodies use, spelled in C++20 for the CPU emulation. Included
// after runtime.h; after this header, `device`, `constant`, `thread` and `threadgroup` are macros, so
// no standard header may follow.
//
// What each construct becomes, and how faithful it is:
// - `device`, `thread`: nothing (one flat address space on the CPU).
// - `constant`: `volatile`. MLX passes an input with fewer than 8 elements as `const constant T*`
//   (and every `<name>_shape` as `const constant int*`); Metal refuses to convert such a pointer to a
//   `device` one, and so does C++ for `const volatile T*` -> `const T*`. Other address-space mixes
//   are not caught.
// - `threadgroup T name[N];` (the only form the bodies use) is rewritten by __init__.py into a
//   reference to a per-threadgroup array shared by the group's threads (runtime.h poisons it with
//   0xFF at the start of every threadgroup); any other use of `threadgroup` fails to compile.
// - `threadgroup_barrier(mem_flags::mem_threadgroup)`, `simd_sum(float)`: real synchronisation
//   among the group's / simdgroup's emulated threads (runtime.h).
// - `bfloat16_t`: 16-bit storage, float -> bfloat16 rounds to nearest even (NaN stays NaN), as
//   Metal's `bfloat` and MLX's own bfloat16 do; conversions are explicit only (stricter than Metal).
// - `half`: the compiler's IEEE binary16 `_Float16` (round to nearest even).
#pragma once

namespace tw {  // <type_traits> would double the compile time of every kernel; these are enough
template <bool B>
struct enable_if {};
template <>
struct enable_if<true> {
  using type = int;
};
}  // namespace tw
#define TW_IF_SAME(U, V) typename ::tw::enable_if<__is_same(U, V)>::type = 0

using uint = unsigned int;
using size_t = decltype(sizeof(0));  // MSL has size_t built in
using uint3 = tw::uint3;

struct bfloat16_t {
  unsigned short bits;

  bfloat16_t() = default;
  explicit bfloat16_t(float f) {
    unsigned int u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) {
      bits = static_cast<unsigned short>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    } else {
      u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
      bits = static_cast<unsigned short>(u >> 16);
    }
  }
  // Copies from a `constant` (volatile) element; templates, so the type stays trivially copyable.
  template <class U, TW_IF_SAME(U, bfloat16_t)>
  bfloat16_t(const volatile U& o) : bits(o.bits) {}
  template <class U, TW_IF_SAME(U, bfloat16_t)>
  bfloat16_t& operator=(const volatile U& o) {
    bits = o.bits;
    return *this;
  }
  template <class U, TW_IF_SAME(U, bfloat16_t)>
  bfloat16_t& operator=(const volatile U&& o) {  // `c ? x[i] : T(0)` with x constant: a cv prvalue
    bits = o.bits;
    return *this;
  }
  explicit operator float() const volatile {
    const unsigned int u = static_cast<unsigned int>(bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(bfloat16_t) == 2 && __is_trivially_copyable(bfloat16_t));

using half = _Float16;

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

template <class A>
inline A min(A a, A b) {  // Metal's min for one scalar type (mixed types do not compile, as in MSL)
  return b < a ? b : a;
}
template <class A>
inline A max(A a, A b) {
  return a < b ? b : a;
}

template <class V>
inline V tw_simd_sum(V v, int line) {
  static_assert(__is_same(V, float), "the emulation implements simd_sum for float only");
  return ::tw::simd_sum(v, line);
}

#define threadgroup_barrier(flags) \
  ::tw::barrier(static_cast<unsigned>(flags), static_cast<unsigned>(mem_flags::mem_threadgroup), __LINE__)
#define simd_sum(v) tw_simd_sum((v), __LINE__)
#define TW_THREADGROUP_ARRAY(type, name, count)                                             \
  type(&name)[count] = *reinterpret_cast<type(*)[count]>(                                   \
      ::tw::threadgroup_alloc(sizeof(type[count]), alignof(type), __LINE__))

#define device
#define thread
#define constant volatile
#define threadgroup TW_EMU_unsupported_threadgroup_declaration
