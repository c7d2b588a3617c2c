// CPU forwards of the base_delta, sparse_lowrank and basis_residual MoEs over the active experts only
// (kernels/base_delta_cpu.py, kernels/sparse_lowrank_cpu.py and kernels/basis_residual_cpu.py document the layouts
// and the equations). One call per layer. The loop over the experts that received tokens calls no ATen op when an
// expert's product has at most small_row_limit activation rows (decode and small batches): raw pointers into the
// prepared per-expert factor blocks, activations and intermediates in fp32 (fp64 for fp64 factors) scratch
// buffers each thread keeps across calls (Arena), SiLU·mul and the routing weight fused into one pass, each routed
// pair's output written into its own row and each token's rows summed at the end (sum_pairs). Larger experts
// (prefill) take at::mm (MKL/oneDNN GEMM) on views of the same buffers, or in bf16 on CPUs
// with AMX ATen's brgemm micro-kernel on AMX tiles (amx_product). The time follows the bytes of the routed
// experts' factors and their FLOPs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/bit_cast.h>
#include <c10/util/llvmMathExtras.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <array>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)  // AVX512-BF16 dot products: bf16_dots
#include <immintrin.h>
#define MOE_COMPRESS_BF16_DOTS 1
#endif
#if defined(__x86_64__) && __has_include(<fbgemm/Utils.h>)  // x86 torch builds ship FBGEMM (transpose32)
#include <fbgemm/Utils.h>
#define MOE_COMPRESS_FBGEMM_TRANSPOSE 1
#endif

namespace {

// ---- Products with few activation rows -------------------------------------------------------------------------
// Every product of an expert's activations a [n, in] (n = the tokens routed to it) with one of its factor blocks
// goes through project (y = a Bᵀ, B [out, in] row-major: x Vᵀ) or expand (y = a B, B [in, out] row-major: z Uᵀ).
// For n ≤ small_row_limit (and up to kCachedBlockRows rows of a small block, fewer where AMX takes them: on_loops)
// these loops read each factor row once from memory and use it for all n rows while it is in registers or L1: the dot
// form keeps kRowBlock × 4 vector accumulators in registers; the axpy form streams the rows of B in order into y (≤ 64
// KiB, in L2), four rows of B per load/store of y (axpys_pairs: the same over B in AMX's pair layout); both prefetch
// the rows of B ahead of their loads (kPrefetchBytes). Written with ATen's at::vec::Vectorized (the ISA torch
// dispatches to here: kernels/cpu_extension.py); measured against at::mm (MKL) in docs/kernels.md. Larger n take gemm
// (at::mm, or amx_product for bf16 on AMX CPUs). bf16/fp16 factors (kept by prepare on CPUs with native bf16/fp16) are
// read as such and summed in fp32; a and y are in the accumulation type, except in bf16_dots (a rounded to bf16).

// bf16/fp16: fp32 FMAs on converted values become compute-bound sooner than a native bf16 GEMM (AVX512-BF16
// dot products: 2 products per lane and instruction): on the AVX-512 EPYC oneDNN was faster at 8 rows, the
// loops at ≤ 4 (docs/kernels.md), where the product has every thread (one that runs on one thread: on_loops).
// A bf16 project of more rows, where the op is built for AVX512-BF16, takes bf16_dots, which stays faster than
// oneDNN up to kDotRowLimit rows.
constexpr int64_t kReducedRowLimit = 4;

int64_t small_row_limit = 8;  // set_small_row_limit (process-wide; not for use during a forward): tests and
                              // benchmarks compare with 0 (at::mm everywhere)
int64_t expert_parallel = 1;  // set_expert_parallel: 1 = threads split the active experts (split_experts)
int64_t amx_gemm = 0;  // set_amx_gemm: 1 = bf16 products above the loops' rows take amx_product (AMX tiles)

// Sums are formed in AccT<T>: T for fp32/fp64, fp32 for bf16/fp16 (converted as they are loaded: the factor's
// bytes stay 16-bit, as in vLLM's own bf16 kernels).
template <typename T>
using AccT = std::conditional_t<c10::is_reduced_floating_point_v<T>, float, T>;

template <typename T>
at::vec::Vectorized<AccT<T>> load_acc(const T* p) {
  if constexpr (c10::is_reduced_floating_point_v<T>) {
    at::vec::Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  } else {
    return at::vec::Vectorized<T>::loadu(p);
  }
}

// Software prefetch of the factor rows kPrefetchBytes ahead of the loads, in each row the loops stream (where a
// row ends, into the next rows of the block). The hardware prefetchers stop at every 4 KiB page — one row of 2048
// bf16 values — so one core streaming a product's few hundred KiB waited on each page's first misses. The
// locality hint 1 (prefetcht2 on x86: into L2, not L1) measured fastest (into L1, hint 3, it gained a third as
// much); 4 KiB ahead beat 2 KiB in 5 of 6 same-run cases by 2–7 % (9 % slower in the sixth), 1 KiB was slower
// (docs/kernels.md, "Prefetch and huge pages"). Every block, also small ones that stay in L2/L3 (the reference
// model's): prefetching only blocks over 128 KiB was 3–14 % slower at its shapes.
// __builtin_prefetch is GCC/Clang's portable builtin (a no-op where the ISA has none). PREFETCH_BYTES=0 at build
// time turns it off (experiments).
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096
#endif
constexpr int64_t kPrefetchBytes = PREFETCH_BYTES;

template <typename T>
constexpr int64_t prefetch_ahead() {
  return kPrefetchBytes / static_cast<int64_t>(sizeof(T));
}

// Call it in the loop that needs it, never from a helper or lambda holding only prefetch loops: GCC (12) treats
// such a function as side-effect free (const) and deletes its calls (amx_product's project did, BENCHMARKS.md
// §10.14); this one-line helper is inlined before that analysis runs.
template <typename T>
inline void prefetch(const T* p) {
  if constexpr (kPrefetchBytes > 0) __builtin_prefetch(p, 0, 1);
}

// y[t, j] (+)= Σ_k a[t, k] b[j, k] for t < R and J rows j0 ≤ j < j0 + J: a [R, K] with row stride lda, b [N, K]
// contiguous rows, y with row stride ldy. The J rows of b are read once for all R tokens; J·R vector
// accumulators stay in registers (independent FMA chains), and each vector load of a or b feeds J or R FMAs.
template <typename T, int R, int J>
void dot_block(const AccT<T>* a, int64_t lda, const T* b, int64_t j0, int64_t K, AccT<T>* y, int64_t ldy,
               bool accumulate) {
  using A = AccT<T>;
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t body = K - K % W;
  V acc[J][R];
  for (int q = 0; q < J; ++q)
    for (int t = 0; t < R; ++t) acc[q][t] = V(A(0));
  for (int64_t k = 0; k < body; k += W) {
    const int64_t f = k + prefetch_ahead<T>();  // the same place kPrefetchBytes on, in these rows or the next J
    const T* next = f < K ? b + j0 * K + f : b + (j0 + J) * K + (f - K);
    for (int q = 0; q < J; ++q) prefetch(next + q * K);
    V w[J];
    for (int q = 0; q < J; ++q) w[q] = load_acc(b + (j0 + q) * K + k);
    for (int t = 0; t < R; ++t) {
      const V x = V::loadu(a + t * lda + k);
      for (int q = 0; q < J; ++q) acc[q][t] = at::vec::fmadd(x, w[q], acc[q][t]);
    }
  }
  for (int q = 0; q < J; ++q) {
    const T* row = b + (j0 + q) * K;
    for (int t = 0; t < R; ++t) {
      A sum = at::vec::vec_reduce_all<A>([](V& u, V& v) { return u + v; }, acc[q][t]);
      for (int64_t k = body; k < K; ++k) sum += a[t * lda + k] * A(row[k]);
      A& out = y[t * ldy + j0 + q];
      out = accumulate ? out + sum : sum;
    }
  }
}

// Rows of b taken kRowBlock at a time: 4 × 4 accumulators fit AVX-512's 32 vector registers, 2 × 4 AVX2's 16.
constexpr int kRowBlock = at::vec::Vectorized<float>::size() >= 16 ? 4 : 2;

// y = a bᵀ for any n: per block of rows of b, the tokens 4 at a time (the block, ≤ 32 KiB, is read from memory once
// and from L1 by the later token groups).
template <typename T>
void dots_rows(const AccT<T>* a, int64_t lda, int64_t n, const T* b, int64_t N, int64_t K, AccT<T>* y,
               int64_t ldy, bool accumulate) {
  for (int64_t j = 0; j < N; j += kRowBlock) {
    const int64_t rows = std::min<int64_t>(kRowBlock, N - j);
    for (int64_t t = 0; t < n; t += 4) {
      const AccT<T>* at = a + t * lda;
      AccT<T>* yt = y + t * ldy;
      const int64_t tokens = std::min<int64_t>(4, n - t);
      if (rows == kRowBlock) {
        switch (tokens) {
          case 4: dot_block<T, 4, kRowBlock>(at, lda, b, j, K, yt, ldy, accumulate); break;
          case 3: dot_block<T, 3, kRowBlock>(at, lda, b, j, K, yt, ldy, accumulate); break;
          case 2: dot_block<T, 2, kRowBlock>(at, lda, b, j, K, yt, ldy, accumulate); break;
          default: dot_block<T, 1, kRowBlock>(at, lda, b, j, K, yt, ldy, accumulate);
        }
      } else {
        for (int64_t q = j; q < N; ++q) switch (tokens) {
            case 4: dot_block<T, 4, 1>(at, lda, b, q, K, yt, ldy, accumulate); break;
            case 3: dot_block<T, 3, 1>(at, lda, b, q, K, yt, ldy, accumulate); break;
            case 2: dot_block<T, 2, 1>(at, lda, b, q, K, yt, ldy, accumulate); break;
            default: dot_block<T, 1, 1>(at, lda, b, q, K, yt, ldy, accumulate);
          }
      }
    }
  }
}

#ifdef MOE_COMPRESS_BF16_DOTS
// The dot form on AVX512-BF16's dot-product instruction (vdpbf16ps: in each fp32 lane of the sum, two bf16
// products of adjacent k): y[t, j] (+)= Σ_k a[t, k] b[j, k] for t < R and the J rows j0 ≤ j < j0 + J of b [N, K]
// (contiguous rows), a [R, K] in bf16 (row stride lda). Each 64-byte load of b feeds R instructions of 32
// multiply-adds; R · J sums stay in registers over the whole K; a K that is not a multiple of 32 ends with masked
// (zeroing) loads. ATen's at::vec has no bf16 dot product, and oneDNN's bf16 GEMM (at::mm) repacks the factor per
// call: at Mixtral-8x7B's base gate/up ([8, 4096] × [4096, 28,672]ᵀ, 2 threads, AVX-512 EPYC) this form took
// 6.4–8.2 ms against at::mm's 13.6–15.1 and the fp32 FMA form's 18–21 (docs/kernels.md). The sums must stay
// in registers: the same loop with its step in a lambda (the body and the masked tail as two calls of it) took
// 17.8 ms, slower than at::mm.
template <int R, int J>
void bf16_dot_block(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t j0, int64_t K, float* y,
                    int64_t ldy, bool accumulate) {
  __m512 acc[J][R];
  for (int q = 0; q < J; ++q)
    for (int t = 0; t < R; ++t) acc[q][t] = _mm512_setzero_ps();
  const int64_t body = K - K % 32;
  for (int64_t k = 0; k < body; k += 32) {
    const int64_t f = k + prefetch_ahead<c10::BFloat16>();  // the same place kPrefetchBytes on, in these rows or
    const c10::BFloat16* next = f < K ? b + j0 * K + f : b + (j0 + J) * K + (f - K);  // the next J
    for (int q = 0; q < J; ++q) prefetch(next + q * K);
    __m512i w[J];
    for (int q = 0; q < J; ++q) w[q] = _mm512_loadu_si512(b + (j0 + q) * K + k);
    for (int t = 0; t < R; ++t) {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(a + t * lda + k);
      for (int q = 0; q < J; ++q) acc[q][t] = _mm512_dpbf16_ps(acc[q][t], x, (__m512bh)w[q]);
    }
  }
  if (body < K) {  // the last K % 32 columns, on zeroing masked loads
    const __mmask32 mask = (__mmask32(1) << (K - body)) - 1;
    for (int t = 0; t < R; ++t) {
      const __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(mask, a + t * lda + body);
      for (int q = 0; q < J; ++q)
        acc[q][t] = _mm512_dpbf16_ps(acc[q][t], x, (__m512bh)_mm512_maskz_loadu_epi16(mask, b + (j0 + q) * K + body));
    }
  }
  for (int q = 0; q < J; ++q)
    for (int t = 0; t < R; ++t) {
      float& out = y[t * ldy + j0 + q];
      const float sum = _mm512_reduce_add_ps(acc[q][t]);
      out = accumulate ? out + sum : sum;
    }
}

// Tokens per bf16_dot_block: 8 × 4 sums (the whole register file; 8 tokens at a time beat 4 or 2 by 10–30 %).
constexpr int kDotTokens = 8;

template <int J>
void bf16_dot_tokens(const c10::BFloat16* a, int64_t lda, int64_t tokens, const c10::BFloat16* b, int64_t j0,
                     int64_t K, float* y, int64_t ldy, bool accumulate) {
  switch (tokens) {
    case 8: return bf16_dot_block<8, J>(a, lda, b, j0, K, y, ldy, accumulate);
    case 7: return bf16_dot_block<7, J>(a, lda, b, j0, K, y, ldy, accumulate);
    case 6: return bf16_dot_block<6, J>(a, lda, b, j0, K, y, ldy, accumulate);
    case 5: return bf16_dot_block<5, J>(a, lda, b, j0, K, y, ldy, accumulate);
    case 4: return bf16_dot_block<4, J>(a, lda, b, j0, K, y, ldy, accumulate);
    case 3: return bf16_dot_block<3, J>(a, lda, b, j0, K, y, ldy, accumulate);
    case 2: return bf16_dot_block<2, J>(a, lda, b, j0, K, y, ldy, accumulate);
    default: return bf16_dot_block<1, J>(a, lda, b, j0, K, y, ldy, accumulate);
  }
}

// y = a bᵀ (dots_rows' contract) for bf16 b on the dot-product instruction; a (fp32) is rounded to bf16 rows
// (abf, n × K) first, as oneDNN's bf16 GEMM and vLLM's bf16 kernels round activations. Per 4 rows of b the
// tokens kDotTokens at a time (a later group re-reads the 4 rows, 32 KiB at K = 4096, from L1/L2).
void bf16_dots(const float* a, int64_t lda, int64_t n, const c10::BFloat16* b, int64_t N, int64_t K, float* y,
               int64_t ldy, bool accumulate, c10::BFloat16* abf) {
  for (int64_t t = 0; t < n; ++t) at::vec::convert(a + t * lda, abf + t * K, K);
  for (int64_t j = 0; j < N; j += 4) {
    const bool whole = j + 4 <= N;
    for (int64_t t = 0; t < n; t += kDotTokens) {
      const int64_t tokens = std::min<int64_t>(kDotTokens, n - t);
      if (whole) {
        bf16_dot_tokens<4>(abf + t * K, K, tokens, b, j, K, y + t * ldy, ldy, accumulate);
      } else {
        for (int64_t q = j; q < N; ++q)
          bf16_dot_tokens<1>(abf + t * K, K, tokens, b, q, K, y + t * ldy, ldy, accumulate);
      }
    }
  }
}
#endif

// The loop of the axpy form: y[t, :] (+)= Σ_k a[t, k] b[k, :] for t < n, a [n, K] with row stride lda, y [n, N]
// with row stride ldy. b is streamed four rows at a time, each vector of them formed once and used for all n rows of
// y (n × N values: ≤ 64 KiB at n = 8, N = 2048, in L2). How b is stored is the caller's: load(k, rows, c, wv) sets
// wv[0..3] to rows k..k + rows - 1 of b at columns [c, c + W) (zero past rows; rows ≤ 4) and prefetches ahead;
// value(k, q, c) is b[k + q, c], for the columns past the last whole vector.
template <typename A, typename Load, typename Value>
inline void axpy_rows(const A* a, int64_t lda, int64_t n, int64_t N, int64_t K, A* y, int64_t ldy, bool accumulate,
                      Load load, Value value) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t body = N - N % W;
  if (!accumulate)
    for (int64_t t = 0; t < n; ++t) std::fill_n(y + t * ldy, N, A(0));
  for (int64_t k = 0; k < K; k += 4) {
    const int64_t rows = std::min<int64_t>(4, K - k);
    for (int64_t c = 0; c < body; c += W) {
      V wv[4];
      load(k, rows, c, wv);
      for (int64_t t = 0; t < n; ++t) {
        const A* s = a + t * lda + k;
        A* yt = y + t * ldy + c;
        V acc = V::loadu(yt);
        for (int q = 0; q < rows; ++q) acc = at::vec::fmadd(V(s[q]), wv[q], acc);
        acc.store(yt);
      }
    }
    for (int64_t c = body; c < N; ++c)
      for (int64_t t = 0; t < n; ++t)
        for (int q = 0; q < rows; ++q) y[t * ldy + c] += a[t * lda + k + q] * value(k, q, c);
  }
}

// axpy_rows over b [K, N] row-major with row stride ldb: four rows of b, each vector converted once (bf16/fp16 to
// fp32 as loaded).
template <typename T>
void axpys(const AccT<T>* a, int64_t lda, int64_t n, const T* b, int64_t ldb, int64_t N, int64_t K, AccT<T>* y,
           int64_t ldy, bool accumulate) {
  using A = AccT<T>;
  using V = at::vec::Vectorized<A>;
  axpy_rows(
      a, lda, n, N, K, y, ldy, accumulate,
      [=](int64_t k, int64_t rows, int64_t c, V* wv) {
        const T* w = b + k * ldb;
        const int64_t f = c + prefetch_ahead<T>();  // kPrefetchBytes on, in these rows or the next four
        const T* next = f < N ? w + f : w + 4 * ldb + (f - N);
        for (int q = 0; q < rows; ++q) prefetch(next + q * ldb);
        for (int q = 0; q < 4; ++q) wv[q] = q < rows ? load_acc(w + q * ldb + c) : V(A(0));
      },
      [=](int64_t k, int q, int64_t c) { return A(b[(k + q) * ldb + c]); });
}

// The bf16 value in the low (half 0) or high (half 1) 16 bits of a 32-bit pair, as fp32: a bf16 is the top half
// of an fp32.
inline float pair_half(uint32_t lane, int half) {
  return c10::bit_cast<float>(half ? lane & 0xFFFF0000u : lane << 16);
}

// axpy_rows over b in the pair layout (Block::pairs): lane j of pair row p (32 bits) holds b[2p, j] in its low and
// b[2p + 1, j] in its high half, pair rows ldp lanes apart. One vector load of lanes gives both rows' fp32 values
// with a shift and a mask (no conversion instruction), so two pair rows (four rows of b) per load/store of y cost
// what axpys's four rows do. The zero row that pads an odd K is never multiplied (a has K columns).
void axpys_pairs(const float* a, int64_t lda, int64_t n, const uint32_t* b, int64_t ldp, int64_t N, int64_t K,
                 float* y, int64_t ldy, bool accumulate) {
  using V = at::vec::Vectorized<float>;
  using Vi = at::vec::Vectorized<int32_t>;
  const Vi high(static_cast<int32_t>(0xFFFF0000u)), shift(16);
  axpy_rows(
      a, lda, n, N, K, y, ldy, accumulate,
      [=](int64_t k, int64_t rows, int64_t c, V* wv) {
        const int64_t pairs = (rows + 1) / 2;
        const uint32_t* w = b + k / 2 * ldp;  // k is a multiple of 4: pair rows k/2 and k/2 + 1
        const int64_t f = c + prefetch_ahead<uint32_t>();  // kPrefetchBytes on, in these pair rows or the next two
        const uint32_t* next = f < N ? w + f : w + 2 * ldp + (f - N);
        for (int q = 0; q < pairs; ++q) prefetch(next + q * ldp);
        for (int q = 0; q < 2; ++q) {
          const Vi lanes = q < pairs ? Vi::loadu(w + q * ldp + c) : Vi(0);
          wv[2 * q] = at::vec::cast<float>(lanes << shift);
          wv[2 * q + 1] = at::vec::cast<float>(lanes & high);
        }
      },
      [=](int64_t k, int q, int64_t c) { return pair_half(b[(k / 2 + q / 2) * ldp + c], q % 2); });
}

// The axpy form for a few rows of a and a block of b that stays in cache: y [n, N] (+)= a [n, K] b [K, N], with a
// tile of y — kTileRows rows of a × kTileVectors vectors of columns — kept in registers over the whole K and written
// once. axpy_rows instead loads and stores y at every four rows of b (and broadcasts each value of a once per vector of
// y), which suits a factor streamed from memory once at decode but is bound by those loads and stores where the block
// is in cache: the reference model's base down at 16 tokens (a [16, 128], b [128, 256]) ran at ~25 GMAC/s on the
// loops, and the expands were a third of its decode calls' samples (perf; BENCHMARKS.md §10.21). Here b is re-read
// from cache per tile of rows. How b is stored is the loader's: Loader::kRows rows of b per step (1 row-major, 2 in the
// pair layout), load(k, c, w) sets w[q] to row k + q at columns [c, c + W).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileRows = 8;  // 8 × 2 accumulators + 4 factor vectors of AVX-512's 32 registers
#else
constexpr int kTileRows = 4;  // of AVX2's 16
#endif
constexpr int kTileVectors = 2;

template <int R, int C, typename A, typename Loader>
void expand_tile(const A* a, int64_t lda, int64_t K, A* y, int64_t ldy, bool accumulate, int64_t c0,
                 const Loader& load) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  constexpr int S = Loader::kRows;
  V acc[R][C];
  for (int t = 0; t < R; ++t)
    for (int c = 0; c < C; ++c) acc[t][c] = accumulate ? V::loadu(y + t * ldy + c0 + c * W) : V(A(0));
  for (int64_t k = 0; k < K; k += S) {
    V w[C][S];
    for (int c = 0; c < C; ++c) load(k, c0 + c * W, w[c]);
    const int rows = static_cast<int>(std::min<int64_t>(S, K - k));  // an odd K's pad row is not multiplied
    for (int t = 0; t < R; ++t)
      for (int q = 0; q < rows; ++q) {
        const V s(a[t * lda + k + q]);
        for (int c = 0; c < C; ++c) acc[t][c] = at::vec::fmadd(s, w[c][q], acc[t][c]);
      }
  }
  for (int t = 0; t < R; ++t)
    for (int c = 0; c < C; ++c) acc[t][c].store(y + t * ldy + c0 + c * W);
}

// y [n, N] (+)= a b over whole tiles: N a multiple of the vector width (on_tiles).
template <typename A, typename Loader>
void expand_tiles(const A* a, int64_t lda, int64_t n, int64_t N, int64_t K, A* y, int64_t ldy, bool accumulate,
                  const Loader& load) {
  constexpr int64_t W = at::vec::Vectorized<A>::size();
  for (int64_t c0 = 0; c0 < N; c0 += kTileVectors * W) {
    const bool whole = c0 + kTileVectors * W <= N;
    for (int64_t t = 0; t < n; t += kTileRows) {
      const A* at = a + t * lda;
      A* yt = y + t * ldy;
      const int64_t rows = std::min<int64_t>(kTileRows, n - t);
      auto tile = [&](auto r) {
        constexpr int kR = decltype(r)::value;
        if (whole) expand_tile<kR, kTileVectors>(at, lda, K, yt, ldy, accumulate, c0, load);
        else for (int64_t c = c0; c < N; c += W) expand_tile<kR, 1>(at, lda, K, yt, ldy, accumulate, c, load);
      };
      switch (rows) {
        case 1: tile(std::integral_constant<int, 1>()); break;
        case 2: tile(std::integral_constant<int, 2>()); break;
        case 3: tile(std::integral_constant<int, 3>()); break;
#if defined(CPU_CAPABILITY_AVX512)
        case 4: tile(std::integral_constant<int, 4>()); break;
        case 5: tile(std::integral_constant<int, 5>()); break;
        case 6: tile(std::integral_constant<int, 6>()); break;
        case 7: tile(std::integral_constant<int, 7>()); break;
#endif
        default: tile(std::integral_constant<int, kTileRows>());
      }
    }
  }
}

// Loaders of b for expand_tiles: row-major [K, N] with row stride ldb (fp32/fp64, or bf16/fp16 converted as loaded),
// or the pair layout (lanes ldp apart: pair row p holds rows 2p and 2p + 1, axpys_pairs).
template <typename T>
struct RowLoader {
  static constexpr int kRows = 1;
  const T* b;
  int64_t ldb;
  void operator()(int64_t k, int64_t c, at::vec::Vectorized<AccT<T>>* w) const { w[0] = load_acc(b + k * ldb + c); }
};

struct PairLoader {
  static constexpr int kRows = 2;
  const uint32_t* b;
  int64_t ldp;
  void operator()(int64_t k, int64_t c, at::vec::Vectorized<float>* w) const {
    using Vi = at::vec::Vectorized<int32_t>;
    const Vi lanes = Vi::loadu(b + k / 2 * ldp + c);
    w[0] = at::vec::cast<float>(lanes << Vi(16));
    w[1] = at::vec::cast<float>(lanes & Vi(static_cast<int32_t>(0xFFFF0000u)));
  }
};

// A [rows, cols] block of a prepared factor (a view: no copy): row-major, or (pairs, bf16 expand-side factors
// where the op's AMX path is on: kernels/cpu_extension.py's pair_rows) in the pair layout that AMX's brgemm takes
// as its B operand (VNNI): rows 2p and 2p + 1 interleaved value by value into 32-bit pairs (lanes), an odd number
// of rows padded with a zero row (stored_rows), stored in column tiles of kPairTile columns (the last one narrower
// where cols is not a multiple): tile by tile, each tile's ⌈rows/2⌉ pair rows in turn, w lanes each (pair_tile).
// A tile is the B operand of one brgemm call, contiguous: with the pair rows of the whole block's width in turn
// (the layout before), each call read 256-byte pieces of rows cols · 4 bytes apart, which the hardware prefetchers
// do not follow; at Mixtral-8x7B's shapes a [64, 808] × [808, 14,336] expand ran 1.3× faster on tiles, the base
// down over 256 tokens 1.4× (a scratch benchmark of the brgemm calls alone, BENCHMARKS.md §10.22).
template <typename T>
struct Block {
  const T* p;
  int64_t rows, cols;
  bool pairs = false;
  // rows of the same tensor after the block that may be read (the next expert's, then the zero tail of
  // kernels/cpu_extension.py's with_tail), so gemm can round a ragged block's rows up to a shared shape (row-major)
  int64_t spare_rows = 0;
};

// Rows [first, first + rows) of a prepared tensor of total_rows rows of cols values (first counted in stored rows),
// the rows after them its spare rows.
template <typename T>
Block<T> row_block(const T* p, int64_t total_rows, int64_t first, int64_t rows, int64_t cols, bool pairs = false) {
  return {p + first * cols, rows, cols, pairs, total_rows - first - rows};
}

constexpr int64_t kPairTile = 64;  // columns per tile of the pair layout (cpu_extension.PAIR_TILE)

// The rows a block of k rows takes in its prepared tensor: k, or k rounded up to even in the pair layout.
inline int64_t stored_rows(int64_t k, bool pairs) {
  return pairs ? k + k % 2 : k;
}

// The first lane of the pair layout's tile that starts at column c0 (a multiple of kPairTile) of a block of k rows:
// every tile before it is kPairTile lanes wide. Its pair rows are min(kPairTile, cols − c0) lanes apart.
inline const uint32_t* pair_tile(const void* p, int64_t k, int64_t c0) {
  return static_cast<const uint32_t*>(p) + c0 * (stored_rows(k, true) / 2);
}

// A factor block of at most kCachedBlockBytes (the reference model's: hidden 256, expert width 128) stays in
// L1/L2 while the loops re-read it per 4 tokens, so they also take up to kCachedBlockRows rows of it: at these
// sizes at::mm costs more than the product (on the AVX-512 EPYC oneDNN's bf16 GEMM took milliseconds for a
// [8, 256] × [256, 256] product; BENCHMARKS.md §10.3).
constexpr int64_t kCachedBlockBytes = 128 << 10;
constexpr int64_t kCachedBlockRows = 64;

// Whether gemm's product with the block b takes amx_product (bf16 where set_amx_gemm(1): a project, y = a Bᵀ, with
// even K; an expand, y = a B, on the pair layout).
template <typename T>
bool on_amx(Block<T> b, bool transposed) {
  return std::is_same_v<T, c10::BFloat16> && amx_gemm && (transposed ? b.cols % 2 == 0 : b.pairs);
}

// Where gemm would take amx_product, a cached block takes the loops up to kAmxCachedBlockRows rows only (else up to
// kCachedBlockRows, against at::mm): the reference model's base gate/up and base down at 16-token decode steps ran
// 2–2.5× faster on AMX tiles than on the loops (one thread: 25.8 → 11.5 and 15.1 → 6.0 µs per call), its experts
// with 5–8 rows faster on the loops (BENCHMARKS.md §10.23).
constexpr int64_t kAmxCachedBlockRows = 15;

// A bf16/fp16 product on one thread (an expert's inside the experts' split, or any product of a one-thread process)
// of a block of at most kOneThreadBlockBytes takes the loops up to small_row_limit rows, not kReducedRowLimit, where
// gemm would take at::mm: there at::mm runs on that one thread too and, besides the product, rounds a into a copy
// and repacks the factor per call; for a block of a few MB the loops were faster. On the AVX-512 EPYC at
// Qwen3-30B-A3B's shapes (experts' blocks ≤ 3.1 MB), 60 %, 32 tokens: base_delta / sparse_lowrank /
// basis_residual 14.1 / 13.9 / 13.7 ms against 16.6 / 17.3 / 19.0 (2 threads), base_delta 22.2 against 23.6 (1
// thread); at Mixtral-8x7B's (blocks of 3–117 MB) the same within the noise. Without the size bound Mixtral
// basis_residual's 8 tokens were 15 % slower (its experts' 117 MB dense down on the loops; BENCHMARKS.md §10.25).
constexpr int64_t kOneThreadBlockBytes = 4 << 20;

// A bf16 project on bf16_dots stays on the loops up to kDotRowLimit rows (where the loops are on: small_row_limit
// > 0): the block read from memory once, each 4 of its rows re-read from cache per 8 rows of a. Against oneDNN's GEMM
// (at::mm, which repacks the factor per call) on the AVX-512 EPYC, 2 threads: Mixtral-8x7B's base gate/up
// ([28,672, 4096]) 8.2 / 11.2 / 21.3 ms against 13.6 / 17.4 / 27.9 at 8 / 16 / 32 rows, an expert's [1600, 2048]
// block of Qwen3-30B-A3B 0.20 / 0.39 / 0.77 against 0.39 / 0.57 / 0.86 ms; at 64 rows the two were even
// (docs/kernels.md).
constexpr int64_t kDotRowLimit = 32;

// Whether a bf16 project on the loops takes bf16_dots (built for AVX512-BF16).
template <typename T>
constexpr bool kBf16Dots =
#ifdef MOE_COMPRESS_BF16_DOTS
    std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

// Whether the shared base down B [H, C] (base_delta, sparse_lowrank) is stored as B itself and projected (out +=
// wh Bᵀ, bf16_dots at 5–32 rows) rather than as Bᵀ [C, H] and expanded: bf16 built for AVX512-BF16, not in the pair
// layout (the op's bf16_dots() tells prepare). Mixtral-8x7B's 117 MB base down at 8 rows took 13.3 ms as an expand
// (at::mm on Bᵀ) and 4.7 as a project; at 1 / 2 rows 4.5 / 6.2 against 4.2 / 4.2 (2 threads, docs/kernels.md).
template <typename T>
bool base_down_projected(bool pairs) {
  return kBf16Dots<T> && !pairs;
}

// Whether basis_residual's dense weights (RFID-MoE's down by default) are stored as W_e [E, out, in] and projected
// (y = h W_eᵀ) rather than as W_eᵀ [E, in, out] and expanded: where the base down is (base_down_projected). An expand
// of 2–4 rows adds each row of W_eᵀ into n rows of y, loaded and stored every four rows of W_eᵀ: over Mixtral-8x7B's
// down (y rows of 4096, 16 KB each) that traffic outgrows L1, and 2 / 3 / 4 rows took 6.6 / 10.0 / 14.0 ms against
// the project's 2.8 / 2.9 / 3.7 (1 row 4.2 / 3.7; Qwen3-30B-A3B's down on one thread 0.17–0.38 against 0.17–0.25;
// docs/kernels.md).
template <typename T>
bool dense_projected(bool pairs) {
  return base_down_projected<T>(pairs);
}

// Whether y = a Bᵀ (transposed) or a B for a of n rows and the block b goes through the loops (else gemm).
template <typename T>
bool on_loops(int64_t n, Block<T> b, bool transposed) {
  const bool amx = on_amx<T>(b, transposed);
  const int64_t bytes = b.rows * b.cols * static_cast<int64_t>(sizeof(T));
  // bf16/fp16 stop at kReducedRowLimit unless at::mm would run on one thread over a block ≤ kOneThreadBlockBytes;
  // a bf16 project on bf16_dots (where AMX tiles would not take it) goes on to kDotRowLimit
  const bool dots = transposed && kBf16Dots<T> && !amx;
  const bool reduced_limit = c10::is_reduced_floating_point_v<T> && !dots &&
                             (amx || bytes > kOneThreadBlockBytes ||
                              !(at::in_parallel_region() || at::get_num_threads() == 1));
  int64_t rows = small_row_limit;
  if (reduced_limit) rows = std::min(small_row_limit, kReducedRowLimit);
  else if (dots && small_row_limit > 0) rows = std::max(small_row_limit, kDotRowLimit);
  return n <= rows || (small_row_limit > 0 && n <= (amx ? kAmxCachedBlockRows : kCachedBlockRows) &&
                       bytes <= kCachedBlockBytes);
}

// Whether the loops' expand of n rows takes expand_tiles (else axpy_rows): at least one whole tile of rows (with 2–7
// rows the tiles were no faster: the reference model's experts at decode), a block that stays in cache (one streamed
// from memory once per call, as at decode at real shapes, keeps the axpy form's row order), and whole vectors of
// columns.
template <typename T>
bool on_tiles(int64_t n, Block<T> b) {
  return n >= kTileRows && b.rows * b.cols * static_cast<int64_t>(sizeof(T)) <= kCachedBlockBytes &&
         b.cols % at::vec::Vectorized<AccT<T>>::size() == 0;
}

template <typename T>
at::TensorOptions options_of() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
}

// ---- Scratch kept across calls ---------------------------------------------------------------------------------

// Memory kept by each thread across calls for the ops' scratch: one block per slot (a call's own buffers, taken on
// the calling thread: kCallSlot; an expert's work buffers, on each thread visiting experts: kWorkSlot; the
// activations converted to the accumulation type: kInputSlot; amx_product's activations in bf16, on the thread that
// calls it: kPackSlot, and its output chunks, on each thread of its parallel region: kChunkSlot; a project's factor
// packed as an expand's: kFactorSlot; bf16_dots' activations in bf16, on each thread of a project: kDotSlot), grown
// to the largest request up to kKeptScratchBytes. Fresh memory for every call's buffers (a prefill call's per-pair
// outputs are megabytes) cost a page fault per 4 KiB on first touch and the heap's trimming on free: 13 % of a
// prefill call's samples at the reference model's shapes (perf, one thread, BENCHMARKS.md §10.21). The blocks live as long
// as their threads: at most kSlots × kKeptScratchBytes per thread, in practice the largest call's buffers (the
// reference model's 1,303-token prefill: ~11 MB; Mixtral-8x7B at 256 tokens: ~95 MB, and 7 MB of amx_product's
// activations: the base down's 256 × 14,336 in bf16, a fresh allocation per call before).
enum Slot { kCallSlot, kWorkSlot, kInputSlot, kPackSlot, kChunkSlot, kFactorSlot, kDotSlot, kSlots };
constexpr size_t kKeptScratchBytes = size_t(256) << 20;

// Every buffer starts on a cache line (kLine bytes): a vector store that straddles two lines costs two (malloc's
// large blocks start 16 bytes into a page).
constexpr size_t kLine = 64;

struct FreeAligned {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBlock = std::unique_ptr<char, FreeAligned>;

AlignedBlock aligned_block(size_t bytes) {
  void* p = std::aligned_alloc(kLine, (bytes + kLine - 1) / kLine * kLine);
  TORCH_CHECK(p, "could not allocate ", bytes, " bytes of scratch");
  return AlignedBlock(static_cast<char*>(p));
}

struct KeptBlock {
  AlignedBlock data;
  size_t size = 0;
  bool busy = false;
};
thread_local KeptBlock kept_blocks[kSlots];

// N scratch buffers of one thread (sizes in values, declared once; each on a cache line; not zeroed), carved from
// one block: the thread's kept block of the slot, or (larger than kKeptScratchBytes, or the slot already in use) an
// allocation of its own, freed with the arena. buffers() gives their pointers in declaration order.
template <typename A, size_t N>
class Arena {
 public:
  Arena(Slot slot, const std::array<int64_t, N>& sizes) {
    constexpr int64_t line = static_cast<int64_t>(kLine / sizeof(A));
    int64_t total = 0;
    for (size_t i = 0; i < N; ++i) {
      offsets_[i] = total;
      total += (sizes[i] + line - 1) / line * line;
    }
    const size_t bytes = std::max<size_t>(1, static_cast<size_t>(total) * sizeof(A));
    KeptBlock& kept = kept_blocks[slot];
    if (kept.busy || bytes > kKeptScratchBytes) {
      own_ = aligned_block(bytes);
      base_ = reinterpret_cast<A*>(own_.get());
      return;
    }
    if (kept.size < bytes) {
      kept.data.reset();  // the old block first: the two are never held at once
      kept.size = 0;      // (a failed allocation leaves an empty slot, not a stale size)
      kept.data = aligned_block(bytes);
      kept.size = bytes;
    }
    kept.busy = true;
    kept_ = &kept;
    base_ = reinterpret_cast<A*>(kept.data.get());
  }
  Arena(Arena&& other) noexcept
      : own_(std::move(other.own_)), kept_(std::exchange(other.kept_, nullptr)), base_(other.base_),
        offsets_(other.offsets_) {}
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena& operator=(Arena&&) = delete;
  ~Arena() {
    if (kept_) kept_->busy = false;
  }
  auto buffers() const { return pointers(std::make_index_sequence<N>()); }

 private:
  template <size_t>
  using Pointer = A*;
  template <size_t... I>
  std::tuple<Pointer<I>...> pointers(std::index_sequence<I...>) const {
    return {(base_ + offsets_[I])...};
  }
  AlignedBlock own_;
  KeptBlock* kept_ = nullptr;
  A* base_ = nullptr;
  std::array<int64_t, N> offsets_{};
};

// ---- Products with many activation rows on AMX CPUs -------------------------------------------------------------
// at::mm on a bf16 product of a prefill-sized expert (~16 rows at 256 tokens) reaches oneDNN's AMX matmul, but
// each call also pays the activations' rounding copy, oneDNN's primitive lookup and memory objects, its copy of
// the plain-layout factor into AMX's VNNI layout and the product's add into y: at Qwen3-30B-A3B shapes and 256
// tokens 39–48 % of the op's time was outside oneDNN's kernels, and inside them the factors were read at 5–8 GB/s
// (BENCHMARKS.md §10.8). amx_product calls ATen's batch-reduce GEMM micro-kernel instead
// (at::native::cpublas::brgemm: oneDNN's ukernel, what Inductor's and vLLM CPU's AMX GEMMs call), with fp32 sums
// written or added straight into y:
// - project (y = a Bᵀ, B = b [N, K] row-major: x Vᵀ) as yᵀ = b aᵀ, b being brgemm's A operand, which the AMX
//   tiles load row by row as stored: the factor is not copied at all. Only aᵀ (the activations, n × K) is packed
//   per call into the VNNI layout of brgemm's B operand; b is taken kAmxRows rows at a time (the next chunk's
//   rows prefetched while this one multiplies) and each yᵀ chunk added into y. Where n > N the factor is the
//   smaller copy: it is packed instead (kFactorSlot) and the product runs as an expand (below, §10.23).
// - expand (y = a B, B = b [K, N]: z Uᵀ) needs B as brgemm's B operand, in VNNI (rows k and k + 1 interleaved
//   into 32-bit pairs): the factor is stored so at load (Block::pairs, prepared where this path is on), so
//   brgemm reads it in place, one column tile of kAmxColumns columns per call (contiguous: Block), the next
//   tile's first piece prefetched meanwhile (without a prefetch base_delta's 256-token call was no faster than
//   with the packing). Packing it per call
//   instead (the previous version) read the factor at 4–6 GB/s and took 28–50 % of a 256-token call
//   (BENCHMARKS.md §10.8–§10.9). An odd K's zero pad row meets a zero column of the activations.
// Project needs even K (VNNI pairs of aᵀ; odd K takes at::mm). bf16 only (fp16 on AMX needs AMX-FP16; fp32 keeps
// MKL). Used where set_amx_gemm(1): kernels/cpu_extension.py sets it on CPUs with AMX-BF16 once the process holds
// the AMX tile state; elsewhere gemm's at::mm, as before.
// Blocking: one brgemm call over a whole inner dimension K re-reads its cached operand (aᵀ, or z) from L2 or
// beyond at every tile step; at Mixtral-8x7B shapes (~64 rows per expert at 256 tokens, the base's project over all
// 256 tokens: a 2 MiB aᵀ per 32 rows of b) the op's products ran at 60–180 GMAC/s. Now K is taken kAmxDepth at a
// time (fp32 C added across the pieces), and project takes b in kAmxRows-row chunks against aᵀ in kAmxTokens-token
// panels. Per kind of product (base_delta, Mixtral shapes, 256 tokens, one thread, loaded host, thread CPU time per
// product; the project's prefetch was missing in these, see below), GMAC/s before →
// after: base gate/up project (n = 256, K = 4096) 176 → 270, base down expand (K = 14,336) 119 → 150, experts'
// gate/up expand (K = 808, N = 14,336) 78 → 117, down project (K = 14,336) 76 → 101, down expand 59 → 118,
// gate/up project 126 → 141; the call 660 → 475 ms. Depths 128–512, 32–256 rows and 32–all tokens per panel were
// tried in a scratch benchmark of these loops (the chosen ones best or within noise). Below kAmxBlockedRows rows
// (Qwen3-30B-A3B's ~16 per expert at 256 tokens) the blocked project was slower (K = 768: 52 → 32 GMAC/s,
// K = 2048: 65 → 55), so those keep the unblocked calls; and project keeps them while aᵀ fits in half of L2
// (amx_blocked).
// Prefetch: while brgemm multiplies one chunk (project) or column block (expand), the first piece of the next one
// is prefetched (the whole next chunk or block where unblocked). Prefetching also the next piece within a chunk
// (f736ee2) issued a burst of prefetches between brgemm calls that the core waited in: at Mixtral shapes and 256
// tokens base_delta took 417 ms with it (397 with only the expand's, as f736ee2 built) against 379 without (same
// run, BENCHMARKS.md §10.14).
constexpr int64_t kAmxBlockedRows = 32;  // the blocking below from this many activation rows on; fewer: one call
                                         // per 32 rows of b (project) or 64 columns (expand) over the whole K
// Project's aᵀ up to this many bytes stays in L2 (2 MiB per core on the Xeon measured) while brgemm walks the
// rows of b, so taking K in pieces only adds calls and the add across them: at Qwen3-30B-A3B shapes the base's
// gate/up project over 256 tokens (aᵀ 256 × 2048 bf16 = 1 MiB) took 3.0–3.2 ms unblocked against 3.4–3.5 ms
// blocked (thread CPU time per call, three same-run comparisons); Mixtral-8x7B's (2 MiB) is the case the
// blocking was made for. Expand's cached operand is a piece of a's rows; it stays blocked from kAmxBlockedRows on
// (unblocked below this size it was slower: Mixtral-8x7B's experts' expands, a 64 × 808 bf16, 142 against 88 ms
// per call, BENCHMARKS.md §10.18), and this size bounds its spans (expand_span).
constexpr int64_t kAmxCachedActivationBytes = 1 << 20;

// Whether amx_product takes the inner dimension in pieces (blocked) for n activation rows and inner size K.
bool amx_blocked(int64_t n, int64_t K, bool transposed) {
  if (n < kAmxBlockedRows) return false;
  return !transposed || n * K * static_cast<int64_t>(sizeof(c10::BFloat16)) > kAmxCachedActivationBytes;
}

// The rows of Ks (a multiple of depth, or all of Ks) expand multiplies for every column block before moving on to
// the next ones: all of them while a's [n, K] bf16 block fits in kAmxCachedActivationBytes, else as many as fit
// (at least one piece). Each brgemm call reads a's rows for its piece; with the whole K per column block, a beyond L2 was re-read
// from L3 or memory for each of the N / kAmxColumns blocks: Mixtral-8x7B's base down over 256 tokens (a: 256 ×
// 14,336 bf16 = 7.3 MB, 64 blocks: 470 MB of re-reads) ran at ~195 GMAC/s against the base gate/up project's ~330
// (BENCHMARKS.md §10.18: 77 → 65–67 ms per call, thread CPU time, same runs). y's [n, kAmxColumns] block is then
// added into once per span instead of once.
int64_t expand_span(int64_t n, int64_t Ks, int64_t depth) {
  const int64_t fit = kAmxCachedActivationBytes / (n * static_cast<int64_t>(sizeof(c10::BFloat16)));
  return std::min(Ks, std::max(depth, fit / depth * depth));
}

constexpr int64_t kAmxRows[2] = {32, 128};  // project: rows of b per chunk, unblocked and blocked (the yᵀ chunk
                                            // [128, n] stays in L2)
constexpr int64_t kAmxTokens = 64;   // project: tokens per aᵀ panel (brgemm's N; [kAmxDepth, 64] bf16 in L1)
// expand: activation rows per brgemm call (its M) on a block narrower than kAmxColumns. All n rows in one call (the
// reference model's experts: ~160 of a 1,303-token prefill, projects to ranks ~20 packed as expands) ran those
// products at half the speed of calls of 32 or 64 rows (16: slower again); on 64-column blocks calls of 32 rows were
// no faster there and slower at Mixtral-8x7B's shapes (256 tokens: basis_residual 98 → 112 ms per call), so those
// take all n rows (BENCHMARKS.md §10.23).
constexpr int64_t kAmxActivationRows = 32;
constexpr int64_t kAmxColumns = 64;  // expand: columns of B per brgemm call (oneDNN's ukernel: blocks ≤ 64 wide)
constexpr int64_t kPackGrain = 1 << 15;  // values per thread at least in amx_product's conversions of a
constexpr int64_t kAmxUnit[2] = {kAmxColumns, 16};  // expand, project: the threads' shares in whole units (AMX
                                                    // tiles hold 16 rows)
constexpr int64_t kAmxDepth[2] = {256, 512};  // expand, project: inner-dimension piece per brgemm call (even)

// dst[j · ld_dst + i] = src[i · ld_src + j] for i < M, j < N: a transpose of 32-bit values (fp32, or bf16 pairs moved
// as such), FBGEMM's SIMD transpose where torch ships it, else plain loops.
inline void transpose32(int64_t M, int64_t N, const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst) {
#ifdef MOE_COMPRESS_FBGEMM_TRANSPOSE
  fbgemm::transpose_simd<float>(M, N, reinterpret_cast<const float*>(src), ld_src, reinterpret_cast<float*>(dst),
                                ld_dst);
#else
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
#endif
}

// a_rows (nullptr: a's rows in order): row t of the activations is a + a_rows[t] · lda, gathered as they are converted
// to bf16 (an expert's tokens read in place from the call's activations, not copied into a buffer of their own).
void amx_product(const float* a, int64_t lda, int64_t n, Block<c10::BFloat16> b, bool transposed, float* y,
                 int64_t ldy, bool accumulate, const int64_t* a_rows = nullptr) {
  using Bf = c10::BFloat16;
  namespace blas = at::native::cpublas;
  const int64_t K = transposed ? b.cols : b.rows, N = transposed ? b.rows : b.cols;
  // A project with more activation rows than b has rows (prefill with small factors: the reference model's experts
  // get ~160 of a 1,303-token prefill's tokens against ranks ~20, its base gate/up 1,303 against 256 rows) packs b
  // instead of aᵀ — the smaller copy — into the pair layout of Bᵀ [K, N] and runs as an expand, y = a Bᵀ: a
  // converted row by row (no transpose) and y written in place (no transpose back). Tile c0 of the layout is the
  // transpose of b's rows [c0, c0 + w) as [w, K/2] 32-bit pairs.
  TORCH_CHECK(K > 0, "amx_product: an empty inner dimension");  // the callers take K = 0 elsewhere
  if (transposed && n > N) {
    const int64_t P = K / 2;
    const Arena<Bf, 1> packed(kFactorSlot, {N * K});
    uint32_t* bt = reinterpret_cast<uint32_t*>(std::get<0>(packed.buffers()));
    const uint32_t* rows = reinterpret_cast<const uint32_t*>(b.p);
    at::parallel_for(0, (N + kPairTile - 1) / kPairTile, std::max<int64_t>(1, kPackGrain / (kPairTile * K)),
                     [&](int64_t c0, int64_t c1) {
                       for (int64_t c = c0 * kPairTile; c < std::min(N, c1 * kPairTile); c += kPairTile) {
                         const int64_t w = std::min(kPairTile, N - c);
                         transpose32(w, P, rows + c * P, P, const_cast<uint32_t*>(pair_tile(bt, K, c)), w);
                       }
                     });
    return amx_product(a, lda, n, {reinterpret_cast<const Bf*>(bt), K, N, true}, false, y, ldy, accumulate,
                       a_rows);
  }
  auto a_row = [&](int64_t t) { return a + (a_rows ? a_rows[t] : t) * lda; };
  const int64_t Ks = transposed ? K : stored_rows(K, true);  // expand: a's columns meeting the stored pair rows
  const bool blocked = amx_blocked(n, K, transposed);
  const int64_t depth = blocked ? kAmxDepth[transposed] : Ks;
  // The activations in bf16, in the calling thread's kept scratch (kPackSlot; not zeroed: every value is written
  // below, expand's pad column included): aᵀ in VNNI per panel of kAmxTokens tokens (project: panel t0 at t0 · K,
  // [K/2, m] 32-bit pairs for its m tokens) or a row-major, zero-padded (expand). Converted by the threads (pieces
  // of aᵀ's pairs, rows of a): on the calling thread alone they were the serial part of each product.
  const Arena<Bf, 2> pack(kPackSlot, {n * Ks, transposed ? std::min(n, kAmxTokens) * K : 0});
  const auto [ab, panel] = pack.buffers();
  if (transposed) {
    // each panel's rows in bf16 (panel [m, K]), then their bf16 pairs, as 32-bit values, transposed: the pair
    // (k, k + 1) of token t (panel t0 of m tokens) lands at t0 · K + 2 · ((k / 2) · m + t − t0). Pair by pair in
    // scalar stores this packing was ~45 % of amx_product's own time in a prefill call at the reference model's
    // shapes. Each thread converts and transposes its pairs [p0, p1) of every panel.
    const int64_t P = K / 2;
    at::parallel_for(0, P, std::max<int64_t>(16, kPackGrain / (2 * n)), [&](int64_t p0, int64_t p1) {
      for (int64_t t0 = 0; t0 < n; t0 += kAmxTokens) {
        const int64_t m = std::min(kAmxTokens, n - t0);
        for (int64_t t = 0; t < m; ++t)
          at::vec::convert(a_row(t0 + t) + 2 * p0, panel + t * K + 2 * p0, 2 * (p1 - p0));
        transpose32(m, p1 - p0, reinterpret_cast<const uint32_t*>(panel) + p0, P,
                    reinterpret_cast<uint32_t*>(ab + t0 * K) + p0 * m, m);
      }
    });
  } else {
    at::parallel_for(0, n, std::max<int64_t>(1, kPackGrain / Ks), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        at::vec::convert(a_row(t), ab + t * Ks, K);
        if (Ks > K) ab[t * Ks + K] = Bf(0.f);
      }
    });
  }
  const int64_t chunk = transposed ? kAmxRows[blocked] : kAmxColumns;
  // the threads' shares in units of kAmxUnit[transposed] rows (project) or columns (expand), each share walked
  // chunk by chunk: whole chunks per share would leave Mixtral-8x7B's experts' down project (808 rows of b, chunks
  // of 128) at 512 rows on one thread and 296 on the other
  const int64_t unit = kAmxUnit[transposed];
  at::parallel_for(0, (N + unit - 1) / unit, 1, [&](int64_t c0, int64_t c1) {
    const int64_t lo0 = c0 * unit, hi = std::min(N, c1 * unit);  // this thread's rows (project) or columns
    if (transposed) {
      // a chunk of yᵀ (each piece's first call writes it) and, to add into y, the chunk as rows
      const Arena<float, 2> chunks(kChunkSlot, {chunk * n, accumulate ? n * chunk : 0});
      const auto [yt, ys] = chunks.buffers();
      for (int64_t lo = lo0; lo < hi; lo += chunk) {
        const int64_t rows = std::min(chunk, hi - lo), next = std::min(chunk, hi - lo - rows);
        // piece by piece: each piece of the chunk's rows of b (128 × 1 KiB) multiplied by every aᵀ panel in turn,
        // in L1/L2 meanwhile. Panel by panel, the chunk (1 MiB at K = 4096) was re-read from L3 for each panel:
        // Mixtral-8x7B's base gate/up project over 256 tokens (four panels) took 1.6–10 ms longer per call, the
        // experts' down projects 2–5 ms (two same-process runs, BENCHMARKS.md §10.18).
        for (int64_t k0 = 0; k0 < K; k0 += depth) {
          for (int64_t t0 = 0; t0 < n; t0 += kAmxTokens) {
            const int64_t m = std::min(kAmxTokens, n - t0);
            // on the last panel's last piece, prefetch the next chunk's first piece (64-byte lines; the hardware
            // prefetchers stop at each row's piece: rows are K · 2 bytes apart). Written out here, not as a
            // helper: GCC 12 found a lambda holding only such loops free of side effects (__builtin_prefetch
            // touches no memory it models) and deleted its calls, so from f736ee2 (the blocking) to this fix no
            // project prefetched (objdump: one prefetch loop in gemm<BFloat16>, the expand's, instead of two),
            // which cost base_delta 10–13 % at Qwen3-30B-A3B shapes and 256 tokens (BENCHMARKS.md §10.14).
            if (t0 + kAmxTokens >= n && k0 + depth >= K)
              for (int64_t j = lo + rows; j < lo + rows + next; ++j)
                for (int64_t k = 0; k < std::min(depth, K); k += 32) prefetch(b.p + j * K + k);
            blas::brgemm(rows, m, std::min(depth, K - k0), K, m, n, k0 > 0, b.p + lo * K + k0,
                         ab + t0 * K + k0 * m, yt + t0);
          }
        }
        // yᵀ's chunk back into y's columns [lo, lo + rows): transposed in place, or into ys and added
        if (!accumulate) {
          transpose32(rows, n, reinterpret_cast<const uint32_t*>(yt), n, reinterpret_cast<uint32_t*>(y + lo),
                      ldy);
        } else {
          transpose32(rows, n, reinterpret_cast<const uint32_t*>(yt), n, reinterpret_cast<uint32_t*>(ys),
                      rows);
          for (int64_t t = 0; t < n; ++t)
            at::vec::map2<float>([](auto u, auto v) { return u + v; }, y + t * ldy + lo, y + t * ldy + lo,
                                 ys + t * rows, rows);
        }
      }
    } else {
      static_assert(kAmxColumns == kPairTile, "expand's column blocks are the pair layout's tiles");
      const int64_t span = expand_span(n, Ks, depth);
      for (int64_t s0 = 0; s0 < Ks; s0 += span) {
        const int64_t s1 = std::min(Ks, s0 + span);
        for (int64_t lo = lo0; lo < hi; lo += chunk) {
          const int64_t cols = std::min(chunk, hi - lo), next = std::min(chunk, hi - lo - cols);
          // the block whose first piece is prefetched on this block's last piece: the next block of this span,
          // after the last one the first block of the next span
          const int64_t next_lo = next > 0 ? lo + cols : lo0, next_k0 = next > 0 ? s0 : s1;
          const int64_t next_cols = next > 0 ? next : (next_k0 < Ks ? std::min(chunk, hi - lo0) : 0);
          const uint32_t* tile = pair_tile(b.p, K, lo);  // this block's tile: cols lanes per pair row
          for (int64_t k0 = s0; k0 < s1; k0 += depth) {
            // on the last piece, prefetch that block's first piece (contiguous in its tile; 64-byte lines)
            if (k0 + depth >= s1 && next_cols > 0) {
              const uint32_t* first = pair_tile(b.p, K, next_lo) + next_k0 / 2 * next_cols;
              const int64_t lanes = (std::min(Ks, next_k0 + depth) - next_k0) / 2 * next_cols;
              for (int64_t j = 0; j < lanes; j += 16) prefetch(first + j);
            }
            const int64_t call_rows = cols < kAmxColumns ? kAmxActivationRows : n;
            for (int64_t r0 = 0; r0 < n; r0 += call_rows)
              blas::brgemm(std::min(call_rows, n - r0), cols, std::min(depth, s1 - k0), Ks, cols, ldy,
                           accumulate || k0 > 0, ab + r0 * Ks + k0, reinterpret_cast<const Bf*>(tile + k0 / 2 * cols),
                           y + r0 * ldy + lo);
          }
        }
      }
    }
    blas::brgemm_release();
  });
}

// A [k, cols] block stored in the pair layout (Block::pairs) as [k, cols] rows: one copy, tile by tile, into a new
// [k', cols] tensor (k' = k rounded up to even), of which the view of the first k rows is returned.
template <typename T>
at::Tensor pair_block_rows(const T* p, int64_t k, int64_t cols) {
  const int64_t pair_rows = stored_rows(k, true) / 2;
  at::Tensor rows = at::empty({2 * pair_rows, cols}, options_of<T>());
  for (int64_t c0 = 0; c0 < cols; c0 += kPairTile) {
    const int64_t w = std::min(kPairTile, cols - c0);
    const at::Tensor tile =
        at::from_blob(const_cast<uint32_t*>(pair_tile(p, k, c0)), {pair_rows, w, 2}, options_of<T>());
    rows.narrow(1, c0, w).view({pair_rows, 2, w}).copy_(tile.permute({0, 2, 1}));
  }
  return rows.narrow(0, 0, k);
}

// The extent gemm's bf16/fp16 at::mm is called with for an extent of n (a's rows, and a ragged block's rows: below):
// n up to kGemmExactRows, else n rounded up to a multiple of an eighth of the power of two at or below it (at least
// 8): 8 shapes per power of two, ≤ 12.5 % more. Rounding every n up to 16 rows made Qwen3-30B-A3B's 256-token
// base_delta call 19 % slower where every shape was cached already (its experts' ~16 rows), up to 8 rows 8 %; taking
// a in pieces of at most 256 rows made the reference model's 1,303-token prefill call 20 % slower (BENCHMARKS.md
// §10.24).
constexpr int64_t kGemmExactRows = 32;

int64_t gemm_extent(int64_t n) {
  if (n <= kGemmExactRows) return n;
  const int64_t step = std::max<int64_t>(8, static_cast<int64_t>(c10::llvm::PowerOf2Floor(n)) / 8);
  return (n + step - 1) / step * step;
}

// y (+)= a Bᵀ (transposed) or a B for the rows above the loops' limit: amx_product where set_amx_gemm(1) (bf16:
// project with even K, expand on the pair layout), else at::mm on views of the buffers (bf16/fp16 factors: a
// rounded to their dtype for the native GEMM and the product added in fp32).
template <typename T>
void gemm(const AccT<T>* a, int64_t lda, int64_t n, Block<T> b, bool transposed, AccT<T>* y, int64_t ldy,
          bool accumulate) {
  using A = AccT<T>;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (on_amx<T>(b, transposed)) return amx_product(a, lda, n, b, transposed, y, ldy, accumulate);
  }
  const int64_t K = transposed ? b.cols : b.rows, N = transposed ? b.rows : b.cols;
  const at::Tensor av = at::from_blob(const_cast<A*>(a), {n, K}, {lda, 1}, options_of<A>());
  at::Tensor yv = at::from_blob(y, {n, N}, {ldy, 1}, options_of<A>());
  if constexpr (std::is_same_v<A, T>) {
    at::Tensor bt = at::from_blob(const_cast<T*>(b.p), {b.rows, b.cols}, options_of<T>());
    if (transposed) bt = bt.t();
    accumulate ? yv.addmm_(av, bt) : yv.copy_(at::mm(av, bt));
  } else {
    // bf16/fp16 at::mm is oneDNN's matmul, which creates (JIT-compiles) a primitive for every new shape: ~0.9 ms
    // each, and an expert's row count n (and a base product's, the call's tokens) is new at almost every prefill
    // call in an engine (the reference model served on the AVX-512 EPYC: 952 primitives made for this op in 13
    // generations, 841 ms; BENCHMARKS.md §10.24). So n is rounded up with zero rows (gemm_extent), and so is a
    // ragged block's extent (experts' sparse units, ranks: their own sizes per expert) where its tensor has the
    // rows after it (Block::spare_rows): an expand's K reads those rows against zero columns of a, a project's N
    // makes output columns that are dropped. A few shapes per power of two of each, which oneDNN's primitive cache
    // keeps.
    const int64_t shape_rows = gemm_extent(n), rounded = gemm_extent(b.rows);
    const int64_t block_rows = !b.pairs && rounded <= b.rows + b.spare_rows ? rounded : b.rows;
    const int64_t shape_k = transposed ? K : block_rows;
    // a block in the pair layout back to [K, N] rows: a copy, only where the AMX path was turned off after prepare
    // (tests)
    at::Tensor bt = b.pairs ? pair_block_rows(b.p, K, N)
                            : at::from_blob(const_cast<T*>(b.p), {block_rows, b.cols}, options_of<T>());
    if (transposed) bt = bt.t();
    at::Tensor ar = at::empty({shape_rows, shape_k}, options_of<T>());  // a rounded to T, then zero rows / columns
    ar.narrow(0, 0, n).narrow(1, 0, K).copy_(av);
    if (shape_k > K) ar.narrow(0, 0, n).narrow(1, K, shape_k - K).zero_();
    if (shape_rows > n) ar.narrow(0, n, shape_rows - n).zero_();
    const at::Tensor prod = at::mm(ar, bt).narrow(0, 0, n).narrow(1, 0, N);
    accumulate ? yv.add_(prod) : yv.copy_(prod);
  }
}

// The loops' work split across threads by blocks of columns of y (each thread reads its own part of b), kColumns
// wide, or narrower (whole vectors of kMinColumns) where fewer blocks than threads would leave a thread idle on a
// product of at least kParallelMacs multiply-adds: the reference model's base gate/up and base down at decode (N =
// 256, 16 tokens: 1 M multiply-adds each) ran on one thread of two. Inside a parallel region (experts split over
// threads) at::parallel_for runs inline.
constexpr int64_t kColumns = 256;
constexpr int64_t kMinColumns = 64;
static_assert(kColumns % kPairTile == 0 && kMinColumns % kPairTile == 0, "column blocks of whole pair tiles");
constexpr int64_t kParallelMacs = 1 << 18;

int64_t column_block(int64_t n, int64_t N, int64_t K) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads < 2 || N >= threads * kColumns || n * N * K < kParallelMacs) return kColumns;
  const int64_t share = (N + threads - 1) / threads;
  return std::max(kMinColumns, (share + kMinColumns - 1) / kMinColumns * kMinColumns);
}

// y [n, N] (+)= a [n, K] Bᵀ for B = b [N, K] row-major (the dot form: x Vᵀ).
template <typename T>
void project(const AccT<T>* a, int64_t lda, int64_t n, Block<T> b, AccT<T>* y, int64_t ldy, bool accumulate) {
  const int64_t N = b.rows, K = b.cols;
  if (n == 0 || N == 0) return;
  if (K == 0 || !on_loops<T>(n, b, true)) {
    if (K == 0) {
      if (!accumulate)
        for (int64_t t = 0; t < n; ++t) std::fill_n(y + t * ldy, N, AccT<T>(0));
    } else {
      gemm<T>(a, lda, n, b, true, y, ldy, accumulate);
    }
    return;
  }
  const int64_t width = column_block(n, N, K);
  at::parallel_for(0, (N + width - 1) / width, 1, [&](int64_t c0, int64_t c1) {
    const int64_t lo = c0 * width, cols = std::min(N, c1 * width) - lo;
#ifdef MOE_COMPRESS_BF16_DOTS
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (n > kReducedRowLimit) {  // at ≤ 4 rows the fp32 FMAs were as fast, 5–10 % faster in the op (one thread)
        const Arena<c10::BFloat16, 1> abf(kDotSlot, {n * K});
        return bf16_dots(a, lda, n, b.p + lo * K, cols, K, y + lo, ldy, accumulate, std::get<0>(abf.buffers()));
      }
    }
#endif
    dots_rows<T>(a, lda, n, b.p + lo * K, cols, K, y + lo, ldy, accumulate);
  });
}

// y [n, N] (+)= a [n, K] B for B = b [K, N], row-major or in the pair layout (the axpy form: z Uᵀ with Uᵀ stored).
template <typename T>
void expand(const AccT<T>* a, int64_t lda, int64_t n, Block<T> b, AccT<T>* y, int64_t ldy, bool accumulate) {
  const int64_t N = b.cols, K = b.rows;
  if (n == 0 || N == 0) return;
  if (K > 0 && !on_loops<T>(n, b, false)) return gemm<T>(a, lda, n, b, false, y, ldy, accumulate);
  const bool tiles = on_tiles<T>(n, b);
  const int64_t width = column_block(n, N, K);
  at::parallel_for(0, (N + width - 1) / width, 1, [&](int64_t c0, int64_t c1) {
    const int64_t lo = c0 * width, cols = std::min(N, c1 * width) - lo;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (b.pairs) {  // tile by tile (lo and width are whole tiles: column_block)
        for (int64_t tile_lo = lo; tile_lo < lo + cols; tile_lo += kPairTile) {
          const int64_t w = std::min(kPairTile, N - tile_lo);
          const uint32_t* tile = pair_tile(b.p, K, tile_lo);
          if (tiles) expand_tiles(a, lda, n, w, K, y + tile_lo, ldy, accumulate, PairLoader{tile, w});
          else axpys_pairs(a, lda, n, tile, w, w, K, y + tile_lo, ldy, accumulate);
        }
        return;
      }
    }
    if (tiles) return expand_tiles(a, lda, n, cols, K, y + lo, ldy, accumulate, RowLoader<T>{b.p + lo, N});
    axpys<T>(a, lda, n, b.p + lo, N, cols, K, y + lo, ldy, accumulate);
  });
}

// D²-MoE's dynamic pruning (Eq. 9) on a batch's base-down input wh [n, C]: zero the `drop` (≥ 1) columns j with
// the lowest C_j = ‖B_down[:, j]‖ · ‖wh[:, j]‖, so the base down's product reads its stored layout as it is.
// `norms` holds ‖B_down[:, j]‖, computed once at load (prepare): the score costs C values per token, not a pass
// over the base down. Ties go to the lower channel.
template <typename A>
void drop_weakest_channels(A* wh, int64_t n, int64_t C, const A* norms, int64_t drop) {
  drop = std::min(drop, C);
  std::vector<A> score(C, A(0));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < C; ++j) score[j] += wh[t * C + j] * wh[t * C + j];
  for (int64_t j = 0; j < C; ++j) score[j] = norms[j] * std::sqrt(score[j]);
  std::vector<int64_t> order(C);
  std::iota(order.begin(), order.end(), 0);
  std::nth_element(order.begin(), order.begin() + (drop - 1), order.end(),
                   [&](int64_t a, int64_t b) { return score[a] < score[b] || (score[a] == score[b] && a < b); });
  for (int64_t k = 0; k < drop; ++k)
    for (int64_t t = 0; t < n; ++t) wh[t * C + order[k]] = A(0);
}

// out [n, H] += wh [n, C] Bᵀ for a stored base down B [H, C] (base_delta's B_down, sparse_lowrank's ridge base;
// `channels` names C in the op's terms): projected where base_down_projected, else expanded from Bᵀ (rows or
// pairs). A base down stored the other way round (a layout prepared for another build of the op) is refused, not
// read past its end.
template <typename T>
void add_base_down(const AccT<T>* wh, int64_t n, int64_t C, const at::Tensor& base_down, bool pairs, AccT<T>* out,
                   int64_t H, const char* op, const char* channels) {
  const bool projected = base_down_projected<T>(pairs);
  TORCH_CHECK(base_down.dim() == 2 && base_down.size(projected ? 0 : 1) == H, op,
              ": this op reads the base down as ", projected ? "B [H, " : "Bᵀ [", channels, projected ? "]" : ", H]",
              " (base_down_projected), got ", base_down.sizes(), " for H = ", H);
  if (projected) project<T>(wh, C, n, {base_down.data_ptr<T>(), H, C}, out, H, true);
  else expand<T>(wh, C, n, {base_down.data_ptr<T>(), C, H, pairs}, out, H, true);
}

// ---- Elementwise parts of an expert, fused -----------------------------------------------------------------------

// Rows added to an expert's gate and up products before SwiGLU (base_delta's shared base, computed once per
// token): gate row t is p + rows[t] · ld, its up row up values further; p = nullptr: nothing added.
template <typename A>
struct Addend {
  const A* p = nullptr;
  int64_t ld = 0, up = 0;
  const int64_t* rows = nullptr;
};

constexpr int64_t kSwigluGrain = 1 << 14;  // values per thread at least in swiglu (outside a parallel region: one
                                           // expert's 64 × 14,336 at Mixtral-8x7B shapes, 1.6 ms on one thread)

// h[t, c] = w_t · silu(g[t, c] + b_g) · (u[t, c] + b_u) (SwiGLU, silu(g) = g / (1 + e^−g); b: base's row of token t,
// zero without one), w = nullptr: no weight. h may be g. The rows split over the threads (inline in a parallel
// region).
template <typename A>
void swiglu(const A* g, int64_t ldg, const A* u, int64_t ldu, int64_t n, int64_t cols, const A* w, A* h, int64_t ldh,
            Addend<A> base = {}) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t grain = std::max<int64_t>(1, kSwigluGrain / std::max<int64_t>(1, cols));
  at::parallel_for(0, n, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const A* gt = g + t * ldg;
      const A* ut = u + t * ldu;
      const A* bg = base.p ? base.p + base.rows[t] * base.ld : nullptr;
      const A* bu = bg ? bg + base.up : nullptr;
      A* ht = h + t * ldh;
      const A s = w ? w[t] : A(1);
      int64_t c = 0;
      for (; c + W <= cols; c += W) {
        V x = V::loadu(gt + c), y = V::loadu(ut + c);
        if (bg) x = x + V::loadu(bg + c), y = y + V::loadu(bu + c);
        const V silu = x / (V(A(1)) + (V(A(0)) - x).exp_u20());
        (silu * y * V(s)).store(ht + c);
      }
      for (; c < cols; ++c) {
        const A x = gt[c] + (bg ? bg[c] : A(0)), y = ut[c] + (bu ? bu[c] : A(0));
        ht[c] = s * x / (A(1) + std::exp(-x)) * y;
      }
    }
  });
}

// An expert's activation rows, x [*, H] at tokens[0..n): x's own row for one token, else gathered into xe [n, H]
// (once, on first use: gathered()). project_rows reads them in place where amx_product takes the product.
template <typename A>
struct ExpertRows {
  const A* x;
  int64_t H;
  const int64_t* tokens;
  int64_t n;
  A* xe;
  const A* rows = nullptr;

  const A* gathered() {
    if (!rows) {
      if (n == 1) return rows = x + tokens[0] * H;
      for (int64_t t = 0; t < n; ++t) std::copy_n(x + tokens[t] * H, H, xe + t * H);
      rows = xe;
    }
    return rows;
  }
};

// y [n, N] = a Bᵀ for an expert's rows a (project): on AMX its bf16 packing gathers the rows (a prefill expert's
// rows were copied in fp32 first: 10 % of a 1,303-token prefill call at the reference model's shapes, one thread,
// BENCHMARKS.md §10.23).
template <typename T>
void project_rows(ExpertRows<AccT<T>>& a, Block<T> b, AccT<T>* y, int64_t ldy) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (a.n > 1 && b.rows > 0 && b.cols > 0 && !on_loops<T>(a.n, b, true) && on_amx<T>(b, true))
      return amx_product(a.x, a.H, a.n, b, true, y, ldy, false, a.tokens);
  }
  project<T>(a.gathered(), a.H, a.n, b, y, ldy, false);
}

// ---- Routing ------------------------------------------------------------------------------------------------

// Routed (token, expert) pairs grouped by expert on the host: tokens[starts[e] .. starts[e+1]) are expert e's, with
// their routing weights in the accumulation type; slot[t · top_k + j] is where token t's j-th pair landed. The ops
// write each pair's result into row slot of per-pair outputs (an expert's rows contiguous) and sum_pairs adds
// each token's rows.
template <typename A>
struct Routing {
  std::vector<int64_t> starts, tokens, slot;
  std::vector<A> weights;
  int64_t top_k = 1;
  int64_t max_rows = 0;  // the most tokens any expert received

  // ids and weights read in their own dtypes (int32 or int64; any floating type): no ATen conversion per call. Every
  // one of the num_tokens tokens must be routed to top_k experts (sum_pairs reads top_k rows per token).
  Routing(const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t num_experts, int64_t num_tokens) {
    const bool index_type = topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong;
    const at::Tensor ids = index_type ? topk_ids.contiguous() : topk_ids.to(at::kLong).contiguous();
    const at::Tensor wts = topk_weights.contiguous();
    TORCH_CHECK(wts.numel() == ids.numel(), "topk_weights and topk_ids differ in size");
    top_k = ids.dim() > 1 ? ids.size(1) : 1;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "routing", [&] {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wts.scalar_type(), "routing", [&] {
        group(ids.data_ptr<index_t>(), wts.data_ptr<scalar_t>(), ids.numel(), num_experts);
      });
    });
    TORCH_CHECK(pairs() == num_tokens * top_k, "topk_ids holds ", pairs(), " routed pairs for ", num_tokens,
                " tokens of top-", top_k);
  }
  int64_t rows(int64_t e) const { return starts[e + 1] - starts[e]; }
  int64_t pairs() const { return static_cast<int64_t>(tokens.size()); }

 private:
  template <typename Id, typename Weight>
  void group(const Id* id, const Weight* wt, int64_t pairs, int64_t num_experts) {
    starts.assign(num_experts + 1, 0);
    tokens.resize(pairs);
    slot.resize(pairs);
    weights.resize(pairs);
    for (int64_t i = 0; i < pairs; ++i) {
      TORCH_CHECK(id[i] >= 0 && id[i] < num_experts, "expert id ", id[i], " out of range");
      ++starts[id[i] + 1];
    }
    for (int64_t e = 0; e < num_experts; ++e) {
      max_rows = std::max(max_rows, starts[e + 1]);
      starts[e + 1] += starts[e];
    }
    std::vector<int64_t> fill(starts.begin(), starts.end() - 1);
    for (int64_t i = 0; i < pairs; ++i) {  // stable: a token's pairs keep their order
      const int64_t at = fill[id[i]]++;
      slot[i] = at;
      tokens[at] = i / top_k;
      weights[at] = static_cast<A>(wt[i]);
    }
  }
};

// Whether the active experts are split over the threads (one parallel region per call): set_expert_parallel on (the
// default), more than one thread and one expert, not already in a parallel region, and either every expert at most
// kCachedBlockRows rows (decode and small batches: products on the loops or small, amx_product's inline on one thread)
// or at least kExpertsPerThread experts per thread (then each thread's GEMMs run single-threaded, and the many experts
// balance the load; fewer, larger experts — Mixtral's 8 at 256 tokens — keep the GEMMs' own column split). Otherwise
// the experts run in turn and each product is split over the threads by columns: a parallel region per product. At 2
// threads, Qwen3-30B-A3B shapes, base_delta 60 %: split 1.35 / 6.8 / 35.5 ms against 2.13 / 11.7 / 52.8 in turn at 1 /
// 8 / 256 tokens (BENCHMARKS.md §10.20; before the build had -fopenmp no split ran in parallel).
constexpr int64_t kExpertsPerThread = 8;
constexpr int64_t kExpertCostRows = 8;    // for_each_expert's balance: an expert's factor reads, as token rows
constexpr int64_t kSumGrain = 1 << 14;       // values per thread at least in sum_pairs

bool split_experts(int64_t active, int64_t max_rows) {
  const int64_t threads = at::get_num_threads();
  return expert_parallel && active > 1 && threads > 1 && !at::in_parallel_region() &&
         (max_rows <= kCachedBlockRows || active >= kExpertsPerThread * threads);
}

// visit(i, work) for the active experts active[i] (experts with routed tokens): work is the expert's scratch
// (make_work() builds it, sized for the largest expert, once per thread), split_experts decides the split. An
// expert writes only its own pairs' rows of the per-pair outputs (Routing::slot), so the experts share no sums: in
// turn, or split over the threads with nothing to reduce but sum_pairs' per-token sums, whose order does not depend
// on which thread ran which expert (on the loops and amx_product the result is the same split or not, at any thread
// count; at::mm's MKL/oneDNN products may round differently on more threads, and a bf16 product of 5–8 rows of a
// block over 128 KiB and ≤ kOneThreadBlockBytes takes the loops split and at::mm in turn on more threads: on_loops).
template <typename A, typename MakeWork, typename Visit>
void for_each_expert(const Routing<A>& routing, const std::vector<int64_t>& active, MakeWork make_work, Visit visit) {
  const int64_t count = static_cast<int64_t>(active.size());
  auto rows_of = [&](int64_t i) { return routing.rows(active[i]); };
  if (!split_experts(count, routing.max_rows)) {
    auto work = make_work();
    for (int64_t i = 0; i < count; ++i) visit(i, work);
    return;
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  // the experts, most rows first (ties in visiting order), cut into one contiguous run per thread of about equal
  // work (an expert costs its rows plus kExpertCostRows for reading its factors; each goes to the run its cost's
  // midpoint falls in): at decode (equal experts) neighbours in visiting order stay on one thread (basis_residual
  // reuses a group's right-factor product across consecutive experts)
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return rows_of(i) > rows_of(j); });
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) total += rows_of(i) + kExpertCostRows;
  std::vector<std::vector<int64_t>> mine(threads);
  int64_t done = 0;
  for (const int64_t i : order) {
    const int64_t cost = rows_of(i) + kExpertCostRows;
    mine[std::min(threads - 1, (2 * done + cost) * threads / (2 * total))].push_back(i);
    done += cost;
  }
  at::parallel_for(0, threads, 1, [&](int64_t th0, int64_t th1) {
    for (int64_t th = th0; th < th1; ++th) {
      auto work = make_work();
      for (const int64_t i : mine[th]) visit(i, work);
    }
  });
}

// out[t, :] = Σ_j rows[slot[t · top_k + j], :] for t < T: each token's per-pair rows (width values each) added in
// its top-k order, tokens split over the threads.
template <typename A>
void sum_pairs(const A* rows, int64_t width, const Routing<A>& routing, int64_t T, A* out) {
  const int64_t k = routing.top_k;
  const int64_t* slot = routing.slot.data();
  at::parallel_for(0, T, std::max<int64_t>(1, kSumGrain / std::max<int64_t>(1, width)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      A* o = out + t * width;
      if (k == 0) std::fill_n(o, width, A(0));
      for (int64_t j = 0; j < k; ++j) {
        const A* r = rows + slot[t * k + j] * width;
        if (j == 0) std::copy_n(r, width, o);
        else at::vec::map2<A>([](auto u, auto v) { return u + v; }, o, o, r, width);
      }
    }
  });
}

constexpr int64_t kConvertGrain = 1 << 15;  // values per thread at least in the conversions of x and the result

// dst[i] = src[i] in dst's type for i < n (at::vec::convert), split over the threads.
template <typename S, typename D>
void convert_values(const S* src, D* dst, int64_t n) {
  at::parallel_for(0, n, kConvertGrain, [&](int64_t i0, int64_t i1) { at::vec::convert(src + i0, dst + i0, i1 - i0); });
}

// The activations x [T, H] in the accumulation type: x's own memory where it is already (contiguous), else converted
// into the thread's kInputSlot scratch with at::vec::convert (no ATen op per call: x.to() and the result's copy_
// were ~13 µs of a ~100 µs decode call at the reference model's shapes, BENCHMARKS.md §10.21).
template <typename A>
struct Activations {
  at::Tensor x;
  std::optional<Arena<A, 1>> converted;
  const A* data = nullptr;

  explicit Activations(const at::Tensor& x_in) : x(x_in.contiguous()) {
    if (x.scalar_type() == c10::CppTypeToScalarType<A>::value) {
      data = x.data_ptr<A>();
      return;
    }
    const int64_t size = x.numel();
    A* p = std::get<0>(converted.emplace(kInputSlot, std::array<int64_t, 1>{size}).buffers());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "activations",
                                    [&] { convert_values(x.data_ptr<scalar_t>(), p, size); });
    data = p;
  }
};

// The [T, cols] result in the caller's dtype from the fp32/fp64 sums.
template <typename A>
at::Tensor result(const A* sums, int64_t T, int64_t cols, const at::Tensor& like) {
  at::Tensor out = at::empty({T, cols}, like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "result",
                                  [&] { convert_values(sums, out.data_ptr<scalar_t>(), T * cols); });
  return out;
}

// ---- base_delta (D²-MoE) ----------------------------------------------------------------------------------------

// Σ_k w_k · expert_{id_k}(x), expert e: W_q = scatter(B_q) + U_e,q V_e,q (q = gate, up, down).
// meta int64 [E, 7]: per expert (first row of its gate V in gu_v, gate rank, up rank, first row of its down V
// in d_v, down rank, first row of its gate Uᵀ in gu_ut, first row of its down Uᵀ in d_ut). Projections to the
// ranks read V [r, in] rows (x Vᵀ); expansions from the ranks read Uᵀ [r, out] (z Uᵀ): gu_ut (gate then up per
// expert) and d_ut follow the order of gu_v and d_v. base_down is B_downᵀ [C, H], or B_down [H, C] where
// base_down_projected; base_down_norms [C] its column norms ‖B_down[:, j]‖ in the accumulation dtype (read only
// with num_dynamic_drop > 0). pairs (one value): the expand-side tensors (gu_ut, d_ut, base_down) are in the pair
// layout (Block::pairs, each block's rows padded to even).
template <typename T>
at::Tensor base_delta_impl(const at::Tensor& x_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                           const at::Tensor& meta_in, const at::Tensor& gu_v, const at::Tensor& gu_ut,
                           const at::Tensor& d_v, const at::Tensor& d_ut, const at::Tensor& base_gu,
                           const at::Tensor& base_down, const at::Tensor& base_down_norms,
                           const at::Tensor& base_channels_in, bool pairs, int64_t num_dynamic_drop) {
  using A = AccT<T>;
  const Activations<A> x(x_in);
  const int64_t T_ = x_in.size(0), H = x_in.size(1), I = d_v.size(1), E = meta_in.size(0);
  const int64_t C = base_channels_in.numel();
  TORCH_CHECK(num_dynamic_drop <= 0 || (base_down_norms.numel() == C && base_down_norms.scalar_type() ==
                                        c10::CppTypeToScalarType<A>::value && base_down_norms.is_contiguous()),
              "base_delta: dynamic pruning needs base_down_norms, ", C, " contiguous values in the op's accumulation "
              "dtype (kernels/base_delta_cpu.py prepare), got ", base_down_norms.sizes(), " ",
              base_down_norms.scalar_type());
  const at::Tensor meta = meta_in.contiguous(), base_channels = base_channels_in.contiguous();
  const int64_t* m = meta.data_ptr<int64_t>();
  const int64_t* channel = base_channels.data_ptr<int64_t>();
  const A* px = x.data;
  const T *guv = gu_v.data_ptr<T>(), *guut = gu_ut.data_ptr<T>(), *dv = d_v.data_ptr<T>(), *dut = d_ut.data_ptr<T>();
  const Routing<A> routing(topk_ids, topk_weights, E, T_);

  // per pair (Routing::slot): its expert's output [pairs, H] and its routing-weighted h [pairs, I], the input of its
  // down delta and, summed per token, of the base down
  const int64_t routed = routing.pairs();
  bool full_base = C == I;
  for (int64_t j = 0; full_base && j < C; ++j) full_base = channel[j] == j;
  // base_out [T, 2C]: the base's gate/up product; scattered [T, 2I]; weighted: Σ w·h per token [T, I]; base_h [T, C]
  const Arena<A, 7> call(kCallSlot, {routed * H, routed * I, T_ * H, C ? T_ * 2 * C : 0,
                                     C && !full_base ? T_ * 2 * I : 0, C ? T_ * I : 0, C && !full_base ? T_ * C : 0});
  const auto [pair_out, pair_h, out, base_out, base_scattered, weighted, base_h] = call.buffers();
  // A base over every channel in order (D²-MoE's default, no base pruning: C = I) is already in the experts'
  // channel order: its gate/up product is their [T, 2I] addend as it is, and the weighted h is the base down's
  // input as it is. Otherwise the product is scattered onto the I channels and h's base columns gathered. At
  // Mixtral-8x7B shapes and 256 tokens the scatter onto [T, 2I] (29 MB, then allocated per call) took 16 ms and the
  // gather 5 ms of a ~390 ms call (BENCHMARKS.md §10.18).
  const A* base_addend = nullptr;  // [T, 2I]: the base's gate/up product once per token, [T, 2C] scattered
  if (C) {
    project<T>(px, H, T_, {base_gu.data_ptr<T>(), 2 * C, H}, base_out, 2 * C, false);
    base_addend = base_out;
    if (!full_base) {
      std::fill_n(base_scattered, T_ * 2 * I, A(0));
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t j = 0; j < C; ++j) {
          base_scattered[t * 2 * I + channel[j]] = base_out[t * 2 * C + j];
          base_scattered[t * 2 * I + I + channel[j]] = base_out[t * 2 * C + C + j];
        }
      base_addend = base_scattered;
    }
  }
  std::vector<int64_t> active;
  int64_t max_gu = 0, max_d = 0;
  for (int64_t e = 0; e < E; ++e)
    if (routing.rows(e)) {
      active.push_back(e);
      max_gu = std::max(max_gu, m[7 * e + 1] + m[7 * e + 2]);
      max_d = std::max(max_d, m[7 * e + 4]);
    }
  const int64_t rows = routing.max_rows;
  struct Work {
    Arena<A, 4> arena;
    A *xe, *gu, *z, *zd;
  };
  auto make_work = [&] {
    Work w{Arena<A, 4>(kWorkSlot, {rows * H, rows * 2 * I, rows * max_gu, rows * max_d})};
    std::tie(w.xe, w.gu, w.z, w.zd) = w.arena.buffers();
    return w;
  };
  auto visit = [&](int64_t i, Work& w) {
    const int64_t e = active[i], begin = routing.starts[e], n = routing.rows(e);
    const int64_t* tokens = routing.tokens.data() + begin;
    const A* wt = routing.weights.data() + begin;
    const int64_t* r = m + 7 * e;  // v_row, rg, ru, d_row, rd, ut_row, dut_row
    const int64_t r0 = r[0], rg = r[1], ru = r[2], d0 = r[3], rd = r[4], u0 = r[5];
    ExpertRows<A> xe{px, H, tokens, n, w.xe};
    A* gu = w.gu;  // [n, 2I] = [U_g z_g | U_u z_u] (the base's part is added in swiglu)
    if (rg + ru) {
      project_rows<T>(xe, {guv + r0 * H, rg + ru, H}, w.z, rg + ru);  // z = [V_g; V_u] x: [n, rg + ru]
      expand<T>(w.z, rg + ru, n, {guut + u0 * I, rg, I, pairs}, gu, 2 * I, false);
      expand<T>(w.z + rg, rg + ru, n, {guut + (u0 + stored_rows(rg, pairs)) * I, ru, I, pairs}, gu + I, 2 * I,
                false);
    } else {
      std::fill_n(gu, n * 2 * I, A(0));
    }
    A* h = pair_h + begin * I;  // h = w · silu(g) ⊙ u, g and u with the base's rows added
    swiglu(gu, 2 * I, gu + I, 2 * I, n, I, wt, h, I, Addend<A>{base_addend, 2 * I, I, tokens});
    A* y = pair_out + begin * H;  // U_d (V_d h): the routing weight is in h
    if (rd) {
      project<T>(h, I, n, {dv + d0 * I, rd, I}, w.zd, rd, false);
      expand<T>(w.zd, rd, n, {dut + r[6] * H, rd, H, pairs}, y, H, false);
    } else {
      std::fill_n(y, n * H, A(0));
    }
  };
  for_each_expert(routing, active, make_work, visit);
  sum_pairs(pair_out, H, routing, T_, out);
  if (C) {  // base down once per token, on the routing-weighted sum: out += wh[:, channels] B_downᵀ
    sum_pairs(pair_h, I, routing, T_, weighted);
    A* wh = weighted;  // [T, C]: the weighted sum itself where the base is full, else its base channels
    if (!full_base) {
      wh = base_h;
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t j = 0; j < C; ++j) wh[t * C + j] = weighted[t * I + channel[j]];
    }
    if (num_dynamic_drop > 0) drop_weakest_channels(wh, T_, C, base_down_norms.data_ptr<A>(), num_dynamic_drop);
    add_base_down<T>(wh, T_, C, base_down, pairs, out, H, "base_delta", "C");
  }
  return result(out, T_, H, x_in);
}

// ---- sparse_lowrank (RS-MoE) ------------------------------------------------------------------------------------

// Expert e keeps s sparse units (dense gate/up rows, down columns) and m low-rank units (rank-k factors over them);
// a shared down base acts on the scattered weighted intermediate once per token.
// meta int64 [E, 12]: per expert (first row in sgu / 2, s, first low-rank channel, m, first row in lv, kg, ku,
// offset of Ugᵀ [kg, m] then Uuᵀ [ku, m] in lut, offset of Vd [kd, m] in ldv, first row in ldut, kd, first row
// in sd_t). base_down: Bᵀ [I, H], or B [H, I] where base_down_projected ([0, H] / [H, 0]: no base). pairs (one
// value): the expand-side tensors (sd_t, lut, ldut, base_down) are in the pair layout (Block::pairs, each block's
// rows padded to even; base_down's I then counts its pad row, a zero column of the weighted h).
template <typename T>
at::Tensor sparse_lowrank_impl(const at::Tensor& x_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                               const at::Tensor& meta_in, const at::Tensor& sgu, const at::Tensor& sd_t,
                               const at::Tensor& lv, const at::Tensor& lut, const at::Tensor& ldv,
                               const at::Tensor& ldut, const at::Tensor& base_down,
                               const at::Tensor& sparse_channels_in, const at::Tensor& lowrank_channels_in,
                               bool pairs) {
  using A = AccT<T>;
  const Activations<A> x(x_in);
  const int64_t T_ = x_in.size(0), H = x_in.size(1), E = meta_in.size(0),
                I = base_down.size(base_down_projected<T>(pairs) ? 1 : 0);
  const at::Tensor meta = meta_in.contiguous(), sparse_channels = sparse_channels_in.contiguous(),
                   lowrank_channels = lowrank_channels_in.contiguous();
  const int64_t* m = meta.data_ptr<int64_t>();
  const int64_t *sch = sparse_channels.data_ptr<int64_t>(), *lch = lowrank_channels.data_ptr<int64_t>();
  const A* px = x.data;
  const T *psgu = sgu.data_ptr<T>(), *psd = sd_t.data_ptr<T>(), *plv = lv.data_ptr<T>(), *plut = lut.data_ptr<T>(),
          *pldv = ldv.data_ptr<T>(), *pldut = ldut.data_ptr<T>();
  const Routing<A> routing(topk_ids, topk_weights, E, T_);
  // per pair (Routing::slot): its expert's output [pairs, H] and, with a base (I > 0), its routing-weighted h on the
  // I channels [pairs, I] (zero on the channels the expert does not keep), summed per token for the base down
  const int64_t routed = routing.pairs();
  const Arena<A, 4> call(kCallSlot, {routed * H, routed * I, T_ * H, T_ * I});
  const auto [pair_out, pair_h, out, weighted] = call.buffers();  // weighted: Σ w·h per token [T, I]
  std::vector<int64_t> active;
  int64_t max_s = 0, max_m = 0, max_k = 0, max_kd = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t* r = m + 12 * e;
    if (routing.rows(e) == 0) continue;
    active.push_back(e);
    max_s = std::max(max_s, r[1]), max_m = std::max(max_m, r[3]);
    max_k = std::max(max_k, r[5] + r[6]), max_kd = std::max(max_kd, r[10]);
  }
  const int64_t rows = routing.max_rows;
  struct Work {
    Arena<A, 6> arena;
    A *xe, *gu, *gate, *up, *z, *zd;
  };
  auto make_work = [&] {
    Work w{Arena<A, 6>(kWorkSlot,
                       {rows * H, rows * 2 * max_s, rows * max_m, rows * max_m, rows * max_k, rows * max_kd})};
    std::tie(w.xe, w.gu, w.gate, w.up, w.z, w.zd) = w.arena.buffers();
    return w;
  };
  auto visit = [&](int64_t i, Work& w) {
    const int64_t e = active[i], begin = routing.starts[e], n = routing.rows(e);
    const int64_t* tokens = routing.tokens.data() + begin;
    const A* wt = routing.weights.data() + begin;
    const int64_t* r = m + 12 * e;  // sp, s, lc, m, lv_row, kg, ku, lu_off, dv_off, du_row, kd, sd_row
    const int64_t sp = r[0], ns = r[1], lc = r[2], nm = r[3], kg = r[5], ku = r[6], kd = r[10];
    ExpertRows<A> xe{px, H, tokens, n, w.xe};
    A *y = pair_out + begin * H, *wh = pair_h + begin * I;
    bool written = false;  // whether y holds a product yet (else the first is written, not added)
    auto add_out = [&](const A* a, int64_t lda, Block<T> b) {  // y += a b
      expand<T>(a, lda, n, b, y, H, written);
      written = true;
    };
    std::fill_n(wh, n * I, A(0));
    auto add_weighted_h = [&](const A* h, int64_t ldh, int64_t cols, const int64_t* channels) {
      if (!I) return;  // no base
      for (int64_t t = 0; t < n; ++t)  // wh[t, channels] += h
        for (int64_t j = 0; j < cols; ++j) wh[t * I + channels[j]] += h[t * ldh + j];
    };
    if (ns) {  // h_S = w · silu(G_S x) ⊙ (U_S x); out += D_S h_S
      project_rows<T>(xe, row_block(psgu, sgu.size(0), 2 * sp, 2 * ns, H), w.gu, 2 * ns);
      swiglu(w.gu, 2 * ns, w.gu + ns, 2 * ns, n, ns, wt, w.gu, 2 * ns);
      add_out(w.gu, 2 * ns, row_block(psd, sd_t.size(0), r[11], ns, H, pairs));
      add_weighted_h(w.gu, 2 * ns, ns, sch + sp);
    }
    if (nm) {  // h_M = w · silu(Ug Vg x) ⊙ (Uu Vu x); out += Ud (Vd h_M)
      project_rows<T>(xe, row_block(plv, lv.size(0), r[4], kg + ku, H), w.z, kg + ku);
      expand<T>(w.z, kg + ku, n, {plut + r[7], kg, nm, pairs}, w.gate, nm, false);  // rank 0: zeros
      expand<T>(w.z + kg, kg + ku, n, {plut + r[7] + stored_rows(kg, pairs) * nm, ku, nm, pairs}, w.up, nm, false);
      swiglu(w.gate, nm, w.up, nm, n, nm, wt, w.gate, nm);
      if (kd) {
        project<T>(w.gate, nm, n, {pldv + r[8], kd, nm}, w.zd, kd, false);
        add_out(w.zd, kd, row_block(pldut, ldut.size(0), r[9], kd, H, pairs));
      }
      add_weighted_h(w.gate, nm, nm, lch + lc);
    }
    if (!written) std::fill_n(y, n * H, A(0));
  };
  for_each_expert(routing, active, make_work, visit);
  sum_pairs(pair_out, H, routing, T_, out);
  if (I) {  // the base down once per token on the weighted h
    sum_pairs(pair_h, I, routing, T_, weighted);
    add_base_down<T>(weighted, T_, I, base_down, pairs, out, H, "sparse_lowrank", "I");
  }
  return result(out, T_, H, x_in);
}

// ---- basis_residual (RFID-MoE, MoBE) ----------------------------------------------------------------------------

// kernels/basis_residual_cpu.py documents the layout: per projection q either a dense W_e (stored W_eᵀ [in, out])
// or W_e = A_e R_e + R̂_e, with R_e a right factor shared by a group (or MoBE's per expert, made at load) and R̂_e
// the hashed residual, regenerated here block by block (never stored).
template <typename T>
struct Projection {
  const T *dense, *right, *coef_t, *eta;  // [E, in, out] (W_eᵀ; W_e [E, out, in] where dense_projected) |
                                         // [rows, in], [Σ K_e, out] (A_eᵀ), [m, a] (s ⊙ η)
  int64_t eta_size;                          // a (0: no residual)
  int64_t right_rows, coef_rows;             // rows of right and coef_t (Block::spare_rows: ranks are per group)
};

// π(t) of kernels/residual_hash.py: the 32-bit hash of position t (< 2^32), modulo the residual size a; the
// modulo by Lemire's exact multiply-shift for 32-bit operands ("Faster remainder by direct computation", 2019).
struct ResidualHash {
  uint32_t seed_term;  // seed · 0x9E3779B9 mod 2^32
  uint64_t a, inverse;  // inverse = ⌊(2^64 − 1) / a⌋ + 1 (a < 2^32)
  ResidualHash(uint64_t seed, uint64_t size)
      : seed_term(static_cast<uint32_t>(seed * 0x9E3779B9ull)), a(size), inverse(~0ull / size + 1) {}
  int64_t operator()(uint64_t t) const {
    uint32_t h = static_cast<uint32_t>(t) + seed_term;
    h = ((h >> 16) ^ h) * 0x045D9F3Bu;
    h = ((h >> 16) ^ h) * 0x045D9F3Bu;
    h = (h >> 16) ^ h;
    if (a > 0xFFFFFFFFull) return h;  // a = 2^32: every h < a
    return static_cast<int64_t>((static_cast<unsigned __int128>(inverse * h) * a) >> 64);
  }
};

constexpr int64_t kResidualBlock = 1 << 14;  // entries of R̂ regenerated at a time (64 KiB in fp32)

// y [n, out] += inp [n, in] R̂ᵀ, R̂[r, c] = eta[π(offset + (row_lo + r)·full_in + col_lo + c)]: blocks of rows of R̂
// regenerated into a small buffer, each multiplied in by project (the loops or a GEMM).
template <typename T>
void add_residual(AccT<T>* y, int64_t ldy, const AccT<T>* inp, int64_t lda, int64_t n, int64_t in, int64_t out,
                  const T* eta, const ResidualHash& bucket, int64_t offset, int64_t full_in, int64_t row_lo,
                  int64_t col_lo) {
  const int64_t rows = std::max<int64_t>(1, kResidualBlock / in);
  at::parallel_for(0, (out + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> block(rows * in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows, nr = std::min(rows, out - r0);
      for (int64_t r = 0; r < nr; ++r) {
        const uint64_t first = static_cast<uint64_t>(offset + (row_lo + r0 + r) * full_in + col_lo);
        for (int64_t c = 0; c < in; ++c) block[r * in + c] = eta[bucket(first + c)];
      }
      project<T>(inp, lda, n, {block.data(), nr, in}, y + r0, ldy, true);
    }
  });
}

// Σ_k w_k · expert_{id_k}(x). meta int64 [E, 11]: per expert its group, its slot in the group, then per
// projection (gate, up, down) the first row of its right factor, its rank K_e and the first row of its A_eᵀ.
// order int64 [E]: the experts in visiting order (sharers of a right factor adjacent: at decode z = R x is
// computed once per right factor). geometry int64 [3]: residual seed, full intermediate size, this rank's
// first intermediate channel. dense: W_eᵀ [E, in, out], or W_e [E, out, in] where dense_projected. pairs (one
// value): the dense W_eᵀ and coef_t are in the pair layout (Block::pairs: per expert, rows padded to even; meta's
// first rows of A_eᵀ count the pad rows).
template <typename T>
at::Tensor basis_residual_impl(const at::Tensor& x_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                               const at::Tensor& meta_in, const at::Tensor& order_in, const at::Tensor& geometry,
                               const at::Tensor* dense, const at::Tensor* right, const at::Tensor* coef_t,
                               const at::Tensor* eta, bool pairs) {
  using A = AccT<T>;
  Projection<T> projs[3];
  int64_t max_rank = 0;
  for (int q = 0; q < 3; ++q) {
    auto ptr = [](const at::Tensor& t) { return t.numel() ? t.data_ptr<T>() : nullptr; };
    projs[q] = {ptr(dense[q]), ptr(right[q]), ptr(coef_t[q]), ptr(eta[q]), eta[q].numel() ? eta[q].size(1) : 0,
                right[q].numel() ? right[q].size(0) : 0, coef_t[q].numel() ? coef_t[q].size(0) : 0};
  }
  const bool projected = dense_projected<T>(pairs);
  const Activations<A> x(x_in);
  const int64_t T_ = x_in.size(0), H = x_in.size(1), E = meta_in.size(0);
  // this rank's intermediate size: the gate's out
  const int64_t I = dense[0].numel() ? dense[0].size(projected ? 1 : 2) : coef_t[0].size(1);
  for (int q = 0; q < 3; ++q) {  // a dense weight stored the other way round (another build's layout) is refused
    const int64_t in = q == 2 ? I : H, out = q == 2 ? H : I;
    const int64_t first_dim = projected ? out : stored_rows(in, pairs);
    TORCH_CHECK(!dense[q].numel() || (dense[q].dim() == 3 && dense[q].size(1) == first_dim),
                "basis_residual: this op reads a dense weight as ",
                projected ? "W_e [E, out, in]" : "W_eᵀ [E, in, out]", " (dense_projected), got ", dense[q].sizes(),
                " for (in, out) = (", in, ", ", out, ")");
  }
  const at::Tensor meta = meta_in.contiguous(), order = order_in.contiguous(), geo = geometry.contiguous();
  const int64_t* m = meta.data_ptr<int64_t>();
  const int64_t* g = geo.data_ptr<int64_t>();
  const int64_t full_i = g[1], lo = g[2];
  const A* px = x.data;
  const Routing<A> routing(topk_ids, topk_weights, E, T_);
  const Arena<A, 2> call(kCallSlot, {routing.pairs() * H, T_ * H});
  const auto [pair_out, out] = call.buffers();  // per pair (Routing::slot): its expert's output; the sum per token
  const bool single = T_ == 1;  // decode: z = R x is shared by the experts with the same right factor
  std::vector<int64_t> active;
  const int64_t* visit_order = order.data_ptr<int64_t>();
  for (int64_t k = 0; k < E; ++k) {
    const int64_t e = visit_order[k];
    if (!routing.rows(e)) continue;
    active.push_back(e);
    for (int q = 0; q < 3; ++q) max_rank = std::max(max_rank, m[11 * e + 3 + 3 * q]);
  }
  int64_t visited = 0;  // every routed pair's row is written: order must list each routed expert once
  for (const int64_t e : active) visited += routing.rows(e);
  TORCH_CHECK(visited == routing.pairs(), "the visiting order misses or repeats routed experts");
  const int64_t rows = routing.max_rows;
  struct Work {
    Arena<A, 6> arena;
    A *xe, *gate, *up, *z[3];
    int64_t cached_row[2] = {-1, -1};  // the right factor whose z = R x z[q] holds (decode)
  };
  auto make_work = [&] {
    Work w{Arena<A, 6>(kWorkSlot, {rows * H, rows * I, rows * I, rows * max_rank, rows * max_rank, rows * max_rank})};
    std::tie(w.xe, w.gate, w.up, w.z[0], w.z[1], w.z[2]) = w.arena.buffers();
    return w;
  };
  // y [n, out] (+)= inp [n, in] W_e,qᵀ
  auto apply = [&](Work& w, const A* inp, int64_t n, int q, int64_t e, A* y, int64_t ldy, bool accumulate) {
    const Projection<T>& p = projs[q];
    const int64_t in = q == 2 ? I : H, out = q == 2 ? H : I;
    if (p.dense && projected) return project<T>(inp, in, n, {p.dense + e * out * in, out, in}, y, ldy, accumulate);
    if (p.dense)
      return expand<T>(inp, in, n, {p.dense + e * stored_rows(in, pairs) * out, in, out, pairs}, y, ldy, accumulate);
    const int64_t* r = m + 11 * e;
    const int64_t right_row = r[2 + 3 * q], rank = r[3 + 3 * q], coef_row = r[4 + 3 * q];
    A* z = w.z[q];
    if (!(single && q < 2 && w.cached_row[q] == right_row)) {
      project<T>(inp, in, n, row_block(p.right, p.right_rows, right_row, rank, in), z, rank, false);  // [n, K]
      if (single && q < 2) w.cached_row[q] = right_row;
    }
    expand<T>(z, rank, n, row_block(p.coef_t, p.coef_rows, coef_row, rank, out, pairs), y, ldy, accumulate);
    if (p.eta_size) {  // gate/up: rows of the full I × H matrix from lo; down: columns of H × I from lo
      const bool down = q == 2;
      const int64_t out_full = down ? H : full_i, in_full = down ? full_i : H;
      const ResidualHash bucket(static_cast<uint64_t>(g[0]), static_cast<uint64_t>(p.eta_size));
      add_residual<T>(y, ldy, inp, in, n, in, out, p.eta + r[0] * p.eta_size, bucket, r[1] * out_full * in_full,
                      in_full, down ? 0 : lo, down ? lo : 0);
    }
  };
  auto visit = [&](int64_t i, Work& w) {
    const int64_t e = active[i], begin = routing.starts[e], n = routing.rows(e);
    const int64_t* tokens = routing.tokens.data() + begin;
    const A* xe = ExpertRows<A>{px, H, tokens, n, w.xe}.gathered();
    apply(w, xe, n, 0, e, w.gate, I, false);
    apply(w, xe, n, 1, e, w.up, I, false);
    swiglu(w.gate, I, w.up, I, n, I, routing.weights.data() + begin, w.gate, I);  // routing weight on h
    apply(w, w.gate, n, 2, e, pair_out + begin * H, H, false);
  };
  for_each_expert(routing, active, make_work, visit);
  sum_pairs(pair_out, H, routing, T_, out);
  return result(out, T_, H, x_in);
}

// ---- The ops: dispatch on the factors' dtype --------------------------------------------------------------------

// The layout's pairs flag (int64 [1], kernels/cpu_extension.py's pairs_flag): the pair layout is bf16 only.
bool pair_layout(const at::Tensor& pairs, const at::Tensor& factor) {
  const bool on = pairs.item<int64_t>() != 0;
  TORCH_CHECK(!on || factor.scalar_type() == at::kBFloat16, "the pair layout is for bf16 factors only");
  return on;
}

at::Tensor base_delta_forward(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              const at::Tensor& meta, const at::Tensor& gu_v, const at::Tensor& gu_ut,
                              const at::Tensor& d_v, const at::Tensor& d_ut, const at::Tensor& base_gu,
                              const at::Tensor& base_down, const at::Tensor& base_down_norms,
                              const at::Tensor& base_channels, const at::Tensor& pairs, int64_t num_dynamic_drop) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu_v.scalar_type(), "base_delta", [&] {
    return base_delta_impl<scalar_t>(x, topk_ids, topk_weights, meta, gu_v.contiguous(), gu_ut.contiguous(),
                                     d_v.contiguous(), d_ut.contiguous(), base_gu.contiguous(),
                                     base_down.contiguous(), base_down_norms, base_channels, pair_layout(pairs, gu_v),
                                     num_dynamic_drop);
  });
}

at::Tensor sparse_lowrank_forward(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                                  const at::Tensor& meta, const at::Tensor& sgu, const at::Tensor& sd_t,
                                  const at::Tensor& lv, const at::Tensor& lut, const at::Tensor& ldv,
                                  const at::Tensor& ldut, const at::Tensor& base_down,
                                  const at::Tensor& sparse_channels, const at::Tensor& lowrank_channels,
                                  const at::Tensor& pairs) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sgu.scalar_type(), "sparse_lowrank", [&] {
    return sparse_lowrank_impl<scalar_t>(x, topk_ids, topk_weights, meta, sgu.contiguous(), sd_t.contiguous(),
                                         lv.contiguous(), lut.contiguous(), ldv.contiguous(), ldut.contiguous(),
                                         base_down.contiguous(), sparse_channels, lowrank_channels,
                                         pair_layout(pairs, sgu));
  });
}

at::Tensor basis_residual_forward(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                                  const at::Tensor& meta, const at::Tensor& order, const at::Tensor& geometry,
                                  const at::Tensor& gate_dense, const at::Tensor& gate_right,
                                  const at::Tensor& gate_coef_t, const at::Tensor& gate_eta,
                                  const at::Tensor& up_dense, const at::Tensor& up_right, const at::Tensor& up_coef_t,
                                  const at::Tensor& up_eta, const at::Tensor& down_dense,
                                  const at::Tensor& down_right, const at::Tensor& down_coef_t,
                                  const at::Tensor& down_eta, const at::Tensor& pairs) {
  const at::Tensor dense[3] = {gate_dense.contiguous(), up_dense.contiguous(), down_dense.contiguous()};
  const at::Tensor right[3] = {gate_right.contiguous(), up_right.contiguous(), down_right.contiguous()};
  const at::Tensor coef[3] = {gate_coef_t.contiguous(), up_coef_t.contiguous(), down_coef_t.contiguous()};
  const at::Tensor eta[3] = {gate_eta.contiguous(), up_eta.contiguous(), down_eta.contiguous()};
  const auto dtype = (gate_dense.numel() ? gate_dense : gate_coef_t).scalar_type();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "basis_residual", [&] {
    return basis_residual_impl<scalar_t>(x, topk_ids, topk_weights, meta, order, geometry, dense, right, coef, eta,
                                         pair_layout(pairs, dense[0].numel() ? dense[0] : coef[0]));
  });
}

// a b through the same dispatch as the ops' products, in a's dtype (tests and benchmarks of the loops alone):
// b = Wᵀ of a row-major W (project) or a row-major b (expand); other strides take at::mm.
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = a.size(0), K = a.size(1), N = b.size(1);
  const bool dot_form = b.stride(0) == 1 && (N == 1 || b.stride(1) == K);
  const bool axpy_form = b.stride(1) == 1 && (K == 1 || b.stride(0) == N);
  if (!at::isFloatingType(a.scalar_type()) || b.scalar_type() != a.scalar_type() || !(dot_form || axpy_form))
    return at::mm(a, b);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "product", [&] {
    using A = AccT<scalar_t>;
    at::Tensor aa = a.to(c10::CppTypeToScalarType<A>::value);
    if (aa.stride(1) != 1) aa = aa.contiguous();
    at::Tensor y = at::empty({n, N}, options_of<A>());
    const scalar_t* pb = b.data_ptr<scalar_t>();
    if (dot_form) project<scalar_t>(aa.data_ptr<A>(), aa.stride(0), n, {pb, N, K}, y.data_ptr<A>(), N, false);
    else expand<scalar_t>(aa.data_ptr<A>(), aa.stride(0), n, {pb, K, N}, y.data_ptr<A>(), N, false);
    return y.to(a.scalar_type());
  });
}

// A contiguous copy of t, converted to dtype, in memory asked to be backed by 2 MiB pages (Linux transparent huge
// pages, madvise: where THP is "madvise", the default here, torch's allocator gets 4 KiB pages). The prepared
// factors live in such copies (kernels/cpu_extension.py's on_huge_pages): the loops read hundreds of MiB per
// layer at random experts, one TLB miss per 4 KiB page otherwise. 2 MiB-aligned, the size rounded up to whole
// 2 MiB pages. Elsewhere (THP off, not Linux) an ordinary aligned allocation.
at::Tensor huge_page_copy(const at::Tensor& t, at::ScalarType dtype) {
  constexpr size_t kPage = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(t.numel()) * c10::elementSize(dtype);
  const size_t size = std::max<size_t>(1, (bytes + kPage - 1) / kPage) * kPage;
  void* p = std::aligned_alloc(kPage, size);
  TORCH_CHECK(p, "huge_page_copy: could not allocate ", size, " bytes");
#ifdef __linux__
  madvise(p, size, MADV_HUGEPAGE);  // a hint: fails harmlessly where THP is off
#endif
  at::Tensor out =
      at::from_blob(p, t.sizes(), [](void* q) { std::free(q); }, t.options().dtype(dtype).device(at::kCPU));
  out.copy_(t);
  return out;
}

int64_t set_small_row_limit(int64_t rows) {
  const int64_t previous = small_row_limit;
  small_row_limit = rows;
  return previous;
}

int64_t set_amx_gemm(int64_t on) {
  const int64_t previous = amx_gemm;
  amx_gemm = on && at::native::cpublas::could_pack(at::kBFloat16);  // ATen built with oneDNN's ukernels
  return previous;
}

// How many threads ran one at::parallel_for region of at::get_num_threads() items: that number where the build
// has OpenMP (compile_flags' -fopenmp), 1 where the pragma was ignored.
int64_t parallel_threads() {
  std::mutex mutex;
  std::set<int> seen;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> lock(mutex);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

int64_t set_expert_parallel(int64_t on) {
  const int64_t previous = expert_parallel;
  expert_parallel = on;
  return previous;
}

}  // namespace

TORCH_LIBRARY(moe_compress_cpu, m) {
  m.def("base_delta(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor meta, Tensor gu_v, Tensor gu_ut, "
        "Tensor d_v, Tensor d_ut, Tensor base_gu, Tensor base_down, Tensor base_down_norms, Tensor base_channels, "
        "Tensor pairs, "
        "int num_dynamic_drop) "
        "-> Tensor");
  m.def("sparse_lowrank(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor meta, Tensor sgu, Tensor sd_t, "
        "Tensor lv, Tensor lut, Tensor ldv, Tensor ldut, Tensor base_down, Tensor sparse_channels, "
        "Tensor lowrank_channels, Tensor pairs) -> Tensor");
  m.def("basis_residual(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor meta, Tensor order, Tensor geometry, "
        "Tensor gate_dense, Tensor gate_right, Tensor gate_coef_t, Tensor gate_eta, Tensor up_dense, "
        "Tensor up_right, Tensor up_coef_t, Tensor up_eta, Tensor down_dense, Tensor down_right, Tensor down_coef_t, "
        "Tensor down_eta, Tensor pairs) "
        "-> Tensor");
  // Products with at most this many activation rows use the single-pass loops (default 8); returns the old
  // limit. Tests and benchmarks set 0 to compare with at::mm everywhere.
  m.def("set_small_row_limit(int rows) -> int", &set_small_row_limit);
  // 1 (the default): the threads split the active experts where split_experts says so (for_each_expert); 0: the
  // experts run in turn, each product split over the threads by columns. Returns the old setting.
  m.def("set_expert_parallel(int on) -> int", &set_expert_parallel);
  m.def("parallel_threads() -> int", &parallel_threads);
  // 1: bf16 products above the loops' rows take amx_product (ATen's brgemm on AMX tiles); 0: at::mm. Only on
  // CPUs with AMX-BF16 whose process holds the AMX tile state (kernels/cpu_extension.py). Returns the old setting.
  m.def("set_amx_gemm(int on) -> int", &set_amx_gemm);
  // Whether the bf16 products above the loops' rows take amx_product now (prepare stores the expand-side bf16
  // factors in the pair layout where they do).
  m.def("amx_gemm() -> int", [] { return amx_gemm; });
  // Whether bf16 projects take bf16_dots (built for AVX512-BF16): prepare stores bf16 base downs outside the pair
  // layout as B [H, C] (base_down_projected) and basis_residual's dense weights as W_e (dense_projected) where so.
  m.def("bf16_dots() -> bool", [] { return kBf16Dots<c10::BFloat16>; });
  // The extent a bf16/fp16 at::mm product is called with for an extent of n (gemm_extent): prepare's zero tails.
  m.def("gemm_extent(int n) -> int", &gemm_extent);
  // a b through the same dispatch as the ops' products (tests and benchmarks of the loops alone).
  m.def("product(Tensor a, Tensor b) -> Tensor");
  // A contiguous copy of a tensor, in dtype, on 2 MiB-aligned memory advised for transparent huge pages (the
  // prepared layouts: kernels/cpu_extension.py's on_huge_pages).
  m.def("huge_page_copy(Tensor t, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_compress_cpu, CPU, m) {
  m.impl("base_delta", &base_delta_forward);
  m.impl("sparse_lowrank", &sparse_lowrank_forward);
  m.impl("basis_residual", &basis_residual_forward);
  m.impl("product", &product);
  m.impl("huge_page_copy", &huge_page_copy);
}
