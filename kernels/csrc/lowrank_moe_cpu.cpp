// CPU forwards of the base_delta, sparse_lowrank and basis_residual MoEs over the active experts only
// (kernels/base_delta_cpu.py, kernels/sparse_lowrank_cpu.py and kernels/basis_residual_cpu.py document the layouts
// and the equations). One call per layer: the loop over experts that received tokens runs here, each product is
// one call on views of the prepared per-expert blocks (no copies of factors): the small-row loops below for an
// expert's 1–8 tokens, at::mm (MKL/oneDNN GEMM) for more, so the time follows the bytes of the routed experts'
// factors and their FLOPs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

// ---- Products with few activation rows -------------------------------------------------------------------------
// Every product of an expert's activations [n, in] (n = the tokens routed to it) with one of its factors goes
// through product / add_product. For n ≤ small_row_limit these loops read each factor row once from
// memory and use it for all n rows while it is in registers or L1: the dot form (b = Wᵀ of a row-major W: x Vᵀ)
// keeps kRowBlock × 4 vector accumulators in registers; the axpy form (row-major b: z Uᵀ) streams the rows of b in
// order into y (≤ 64 KiB, in L2), four rows of b per load/store of y. Written with ATen's at::vec::Vectorized (the ISA torch
// dispatches to here: kernels/cpu_extension.py); measured against at::mm (MKL) in docs/kernels.md. Larger n take
// at::mm. bf16/fp16 factors (kept by prepare on CPUs with native bf16/fp16) are read as such, summed in fp32.

// bf16/fp16: fp32 FMAs on converted values become compute-bound sooner than a native bf16 GEMM (AVX512-BF16
// dot products: 2 products per lane and instruction): on the AVX-512 EPYC oneDNN was faster at 8 rows, the
// loops at ≤ 4 (docs/kernels.md).
constexpr int64_t kReducedRowLimit = 4;

int64_t small_row_limit = 8;  // set_small_row_limit (process-wide; not for use during a forward): tests and
                              // benchmarks compare with 0 (at::mm everywhere)

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

// y[t, j] (+)= Σ_k a[t, k] b[j, k] for t < R and J rows j0 ≤ j < j0 + J: a [R, K] (in AccT) with row stride lda, b [N, K]
// contiguous rows, y with row stride ldy. The J rows of b are read once for all R tokens; J·R vector
// accumulators stay in registers (independent FMA chains), and each vector load of a or b feeds J or R FMAs.
template <typename T, int R, int J>
void dot_block(const AccT<T>* a, int64_t lda, const T* b, int64_t j0, int64_t K, T* y, int64_t ldy,
               bool accumulate) {
  using A = AccT<T>;
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t body = K - K % W;
  V acc[J][R];
  for (int q = 0; q < J; ++q)
    for (int t = 0; t < R; ++t) acc[q][t] = V(A(0));
  for (int64_t k = 0; k < body; k += W) {
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
      T& out = y[t * ldy + j0 + q];
      out = T(accumulate ? A(out) + sum : sum);
    }
  }
}

// Rows of b taken kRowBlock at a time: 4 × 4 accumulators fit AVX-512's 32 vector registers, 2 × 4 AVX2's 16.
constexpr int kRowBlock = at::vec::Vectorized<float>::size() >= 16 ? 4 : 2;

// y = a bᵀ for any n: per block of rows of b, the tokens 4 at a time (the block, ≤ 32 KiB, is read from memory once
// and from L1 by the later token groups).
template <typename T>
void dots_rows(const AccT<T>* a, int64_t lda, int64_t n, const T* b, int64_t N, int64_t K, T* y, int64_t ldy,
               bool accumulate) {
  for (int64_t j = 0; j < N; j += kRowBlock) {
    const int64_t rows = std::min<int64_t>(kRowBlock, N - j);
    for (int64_t t = 0; t < n; t += 4) {
      const AccT<T>* at = a + t * lda;
      T* yt = y + t * ldy;
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

// y[t, :] (+)= Σ_k a[t, k] b[k, :] for t < n: a [n, K] with row stride lda, b [K, N] with row stride ldb. b is
// streamed row by row, four rows per load and store of y (n × N values: ≤ 64 KiB at n = 8, N = 2048, in L2).
// axpys for bf16/fp16: the n × N sums in an fp32 buffer (≤ 64 KiB, in L2); four rows of b at a time, each
// vector of them converted once and used for all n rows; y rounded once at the end.
template <typename T>
void axpys_reduced(const T* a, int64_t lda, int64_t n, const T* b, int64_t ldb, int64_t N, int64_t K, T* y,
                   int64_t ldy, bool accumulate) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  const int64_t body = N - N % W;
  std::vector<float> sums(n * N, 0.0f), coef(4 * n);
  if (accumulate)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < N; ++c) sums[t * N + c] = float(y[t * ldy + c]);
  for (int64_t k = 0; k < K; k += 4) {
    const int64_t rows = std::min<int64_t>(4, K - k);
    const T* w = b + k * ldb;
    for (int64_t t = 0; t < n; ++t)
      for (int q = 0; q < 4; ++q) coef[4 * t + q] = q < rows ? float(a[t * lda + k + q]) : 0.0f;
    for (int64_t c = 0; c < body; c += W) {
      V wv[4];
      for (int q = 0; q < 4; ++q) wv[q] = q < rows ? load_acc(w + q * ldb + c) : V(0.0f);
      for (int64_t t = 0; t < n; ++t) {
        const float* s = coef.data() + 4 * t;
        float* st = sums.data() + t * N + c;
        V acc = V::loadu(st);
        for (int q = 0; q < 4; ++q) acc = at::vec::fmadd(V(s[q]), wv[q], acc);
        acc.store(st);
      }
    }
    for (int64_t c = body; c < N; ++c)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t q = 0; q < rows; ++q) sums[t * N + c] += coef[4 * t + q] * float(w[q * ldb + c]);
  }
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < N; ++c) y[t * ldy + c] = T(sums[t * N + c]);
}

template <typename T>
void axpys(const T* a, int64_t lda, int64_t n, const T* b, int64_t ldb, int64_t N, int64_t K, T* y, int64_t ldy,
           bool accumulate) {
  if constexpr (c10::is_reduced_floating_point_v<T>) {
    axpys_reduced(a, lda, n, b, ldb, N, K, y, ldy, accumulate);
    return;
  }
  if (!accumulate)
    for (int64_t t = 0; t < n; ++t) std::fill_n(y + t * ldy, N, T(0));
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const T* w = b + k * ldb;
    for (int64_t t = 0; t < n; ++t) {
      const T* s = a + t * lda + k;
      T* yt = y + t * ldy;
      for (int64_t c = 0; c < N; ++c)
        yt[c] += s[0] * w[c] + s[1] * w[ldb + c] + s[2] * w[2 * ldb + c] + s[3] * w[3 * ldb + c];
    }
  }
  for (; k < K; ++k) {
    const T* w = b + k * ldb;
    for (int64_t t = 0; t < n; ++t) {
      const T s = a[t * lda + k];
      T* yt = y + t * ldy;
      for (int64_t c = 0; c < N; ++c) yt[c] += s * w[c];
    }
  }
}

// Work split across threads by blocks of kColumns columns of y (each thread reads its own part of b).
constexpr int64_t kColumns = 256;

// y (+)= a b for a [n, K], b [K, N] given as a view: b = W.t() of a row-major W [N, K] (dot form) or a row-major
// [K, N] (axpy form). The loops above for floating types with n ≤ small_row_limit and unit inner strides, split over
// the threads by columns of y; at::mm / addmm_ otherwise.
bool small_product(const at::Tensor& y, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t n = a.size(0), K = a.size(1), N = b.size(1);
  const auto dtype = a.scalar_type();
  const int64_t limit = at::isReducedFloatingType(dtype) ? std::min(small_row_limit, kReducedRowLimit) : small_row_limit;
  if (n > limit || !at::isFloatingType(dtype) || b.scalar_type() != dtype ||
      y.scalar_type() != dtype || a.stride(1) != 1 || y.stride(1) != 1)
    return false;
  const bool dot_form = b.stride(0) == 1 && (N == 1 || b.stride(1) == K);
  if (!dot_form && !(b.stride(1) == 1 && (K == 1 || b.stride(0) == N))) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "small_product", [&] {
    using acc_t = AccT<scalar_t>;
    // The dot form reads a once per row block of b: a bf16/fp16 a is converted to fp32 once here (n × K values).
    at::Tensor a_acc = a;
    if constexpr (!std::is_same_v<acc_t, scalar_t>)
      if (dot_form) a_acc = a.to(at::kFloat);
    const acc_t* pa_acc = dot_form ? a_acc.data_ptr<acc_t>() : nullptr;
    const int64_t lda_acc = a_acc.stride(0);
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    const int64_t lda = a.stride(0), ldy = y.stride(0);
    at::parallel_for(0, (N + kColumns - 1) / kColumns, 4, [&](int64_t c0, int64_t c1) {
      const int64_t lo = c0 * kColumns, cols = std::min(N, c1 * kColumns) - lo;
      if (dot_form)
        dots_rows<scalar_t>(pa_acc, lda_acc, n, pb + lo * K, cols, K, py + lo, ldy, accumulate);
      else
        axpys<scalar_t>(pa, lda, n, pb + lo, N, cols, K, py + lo, ldy, accumulate);
    });
  });
  return true;
}

// a b (at::mm's result) and y += a b (y.addmm_), through small_product where it applies.
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  if (a.size(0) > small_row_limit) return at::mm(a, b);
  at::Tensor y = at::empty({a.size(0), b.size(1)}, a.options());
  return small_product(y, a, b, false) ? y : at::mm(a, b);
}

void add_product(const at::Tensor& y, const at::Tensor& a, const at::Tensor& b) {
  if (!small_product(y, a, b, true)) y.addmm_(a, b);
}

int64_t set_small_row_limit(int64_t rows) {
  const int64_t previous = small_row_limit;
  small_row_limit = rows;
  return previous;
}

// Routed (token, expert) pairs grouped by expert on the host: tokens[starts[e] .. starts[e+1]) are expert e's.
struct Pairs {
  std::vector<int64_t> starts, tokens, slots;
};

Pairs group_pairs(const at::Tensor& topk_ids, int64_t num_experts) {
  auto ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t pairs = ids.numel(), top_k = ids.size(1);
  Pairs p{std::vector<int64_t>(num_experts + 1, 0), std::vector<int64_t>(pairs), std::vector<int64_t>(pairs)};
  for (int64_t i = 0; i < pairs; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < num_experts, "expert id ", id[i], " out of range");
    ++p.starts[id[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) p.starts[e + 1] += p.starts[e];
  std::vector<int64_t> fill(p.starts.begin(), p.starts.end() - 1);
  for (int64_t i = 0; i < pairs; ++i) {  // stable: a token's pairs keep their order
    const int64_t at = fill[id[i]]++;
    p.tokens[at] = i / top_k;
    p.slots[at] = i;
  }
  return p;
}

// Σ_k w_k · expert_{id_k}(x), expert e: W_q = scatter(B_q) + U_e,q V_e,q (q = gate, up, down).
// meta int64 [E, 5]: per expert (first row of its gate V in gu_v, gate rank, up rank, first row of its down V
// in d_v, down rank). Projections to the ranks read V [r, in] rows (x Vᵀ); expansions from the ranks read
// Uᵀ [r, out] rows (z Uᵀ): gu_ut and d_ut have the row order of gu_v and d_v. base_down_t is B_downᵀ [C, H].
at::Tensor base_delta_forward(const at::Tensor& x_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                              const at::Tensor& meta_in, const at::Tensor& gu_v, const at::Tensor& gu_ut,
                              const at::Tensor& d_v, const at::Tensor& d_ut, const at::Tensor& base_gu,
                              const at::Tensor& base_down_t, const at::Tensor& base_channels,
                              int64_t num_dynamic_drop) {
  const auto dtype = gu_v.scalar_type();
  const at::Tensor x = x_in.to(dtype).contiguous();
  const int64_t T = x.size(0), H = x.size(1), I = d_v.size(1), E = meta_in.size(0);
  const int64_t C = base_channels.numel();
  const at::Tensor meta = meta_in.contiguous();
  const int64_t* m = meta.data_ptr<int64_t>();
  const Pairs pairs = group_pairs(topk_ids, E);
  const at::Tensor token_of = at::tensor(pairs.tokens, at::kLong);
  const at::Tensor weight_of = topk_weights.reshape({-1}).to(dtype).index_select(0, at::tensor(pairs.slots, at::kLong));

  const auto opts = x.options();
  at::Tensor out = at::zeros({T, H}, opts);
  at::Tensor base_full, weighted_h;
  if (C) {  // base gate/up once per token, scattered onto the I channels: [T, 2I] = [S B_g x | S B_u x]
    const at::Tensor b = product(x, base_gu.t()).view({T, 2, C});
    base_full = at::zeros({T, 2, I}, opts).index_copy_(2, base_channels, b).view({T, 2 * I});
    weighted_h = at::zeros({T, I}, opts);
  }
  const bool single = T == 1;  // decode: every pair is token 0, so no gather or scatter
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = pairs.starts[e], n = pairs.starts[e + 1] - begin;
    if (n == 0) continue;
    const int64_t* r = m + 5 * e;  // v_row, rg, ru, d_row, rd
    const int64_t rg = r[1], ru = r[2], rd = r[4];
    const at::Tensor tokens = token_of.narrow(0, begin, n);
    const at::Tensor w = weight_of.narrow(0, begin, n).unsqueeze(1);
    const at::Tensor xe = single ? x : x.index_select(0, tokens);
    // gu starts as the base addend and receives U z in the GEMMs' accumulate (addmm): [n, 2I] = [g | u]
    at::Tensor gu = !C ? at::zeros({n, 2 * I}, opts) : single ? base_full.clone() : base_full.index_select(0, tokens);
    at::Tensor gate = gu.narrow(1, 0, I), up = gu.narrow(1, I, I);
    if (rg + ru) {
      const at::Tensor z = product(xe, gu_v.narrow(0, r[0], rg + ru).t());  // [n, rg + ru]
      if (rg) add_product(gate, z.narrow(1, 0, rg), gu_ut.narrow(0, r[0], rg));
      if (ru) add_product(up, z.narrow(1, rg, ru), gu_ut.narrow(0, r[0] + rg, ru));
    }
    const at::Tensor h = at::silu_(gate).mul_(up);  // [n, I]
    if (C) single ? weighted_h.add_(h * w) : weighted_h.index_add_(0, tokens, h * w);
    if (rd) {
      const at::Tensor zd = product(h, d_v.narrow(0, r[3], rd).t()).mul_(w);  // routing weight on the rank side
      const at::Tensor u_down = d_ut.narrow(0, r[3], rd);
      if (single) add_product(out, zd, u_down);
      else out.index_add_(0, tokens, product(zd, u_down));
    }
  }
  if (C) {
    at::Tensor bd = base_down_t, wh = weighted_h.index_select(1, base_channels);  // [T, C]
    if (num_dynamic_drop > 0) {  // D²-MoE Eq. 9: drop the lowest ‖B_down[:, j]‖·‖H[:, j]‖ columns of this batch
      const at::Tensor score = base_down_t.to(at::kFloat).norm(2, {1}) * wh.to(at::kFloat).norm(2, {0});
      const at::Tensor keep = std::get<1>(score.topk(C - num_dynamic_drop));
      bd = base_down_t.index_select(0, keep);
      wh = wh.index_select(1, keep);
    }
    add_product(out, wh, bd);  // base down once per token, on the routing-weighted sum
  }
  return out.to(x_in.scalar_type());
}

// RS-MoE: expert e keeps s sparse units (dense gate/up rows, down columns) and m low-rank units (rank-k
// factors over them); a shared down base acts on the scattered weighted intermediate once per token.
// meta int64 [E, 11]: per expert (first row in sgu / 2, s, first low-rank channel, m, first row in lv, kg, ku,
// offset of Ugᵀ [kg, m] then Uuᵀ [ku, m] in lut, offset of Vd [kd, m] in ldv, first row in ldut, kd).
at::Tensor sparse_lowrank_forward(const at::Tensor& x_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                                  const at::Tensor& meta_in, const at::Tensor& sgu, const at::Tensor& sd_t,
                                  const at::Tensor& lv, const at::Tensor& lut, const at::Tensor& ldv,
                                  const at::Tensor& ldut, const at::Tensor& base_down_t,
                                  const at::Tensor& sparse_channels, const at::Tensor& lowrank_channels) {
  const auto dtype = sgu.scalar_type();
  const at::Tensor x = x_in.to(dtype).contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = meta_in.size(0), I = base_down_t.size(0);
  const at::Tensor meta = meta_in.contiguous();
  const int64_t* m = meta.data_ptr<int64_t>();
  const Pairs pairs = group_pairs(topk_ids, E);
  const at::Tensor token_of = at::tensor(pairs.tokens, at::kLong);
  const at::Tensor weight_of = topk_weights.reshape({-1}).to(dtype).index_select(0, at::tensor(pairs.slots, at::kLong));
  at::Tensor out = at::zeros({T, H}, x.options());
  at::Tensor weighted_h = I ? at::zeros({T, I}, x.options()) : at::Tensor();
  const bool single = T == 1;  // decode: every pair is token 0, so no gather or scatter
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = pairs.starts[e], n = pairs.starts[e + 1] - begin;
    const int64_t* r = m + 11 * e;  // sp, s, lc, m, lv_row, kg, ku, lu_off, dv_off, du_row, kd
    const int64_t sp = r[0], ns = r[1], lc = r[2], nm = r[3], kg = r[5], ku = r[6], kd = r[10];
    if (n == 0 || ns + nm == 0) continue;
    const at::Tensor tokens = token_of.narrow(0, begin, n);
    const at::Tensor w = weight_of.narrow(0, begin, n).unsqueeze(1);
    const at::Tensor xe = single ? x : x.index_select(0, tokens);
    auto add_out = [&](const at::Tensor& a, const at::Tensor& b) {  // out[tokens] += a b
      if (single) add_product(out, a, b);
      else out.index_add_(0, tokens, product(a, b));
    };
    auto add_weighted_h = [&](const at::Tensor& h, const at::Tensor& channels) {  // weighted_h[tokens, channels] += h
      if (!I) return;
      single ? weighted_h.index_add_(1, channels, h)
             : weighted_h.index_put_({tokens.unsqueeze(1), channels.unsqueeze(0)}, h, /*accumulate=*/true);
    };
    if (ns) {  // h_S = w · silu(G_S x) ⊙ (U_S x); out += D_S h_S
      const at::Tensor gu = product(xe, sgu.narrow(0, 2 * sp, 2 * ns).t());
      const at::Tensor h = at::silu(gu.narrow(1, 0, ns)).mul_(gu.narrow(1, ns, ns)).mul_(w);
      add_out(h, sd_t.narrow(0, sp, ns));
      add_weighted_h(h, sparse_channels.narrow(0, sp, ns));
    }
    if (nm) {  // h_M = w · silu(Ug Vg x) ⊙ (Uu Vu x); out += Ud (Vd h_M)
      const at::Tensor z = kg + ku ? product(xe, lv.narrow(0, r[4], kg + ku).t()) : at::Tensor();
      at::Tensor gate = kg ? product(z.narrow(1, 0, kg), lut.narrow(0, r[7], kg * nm).view({kg, nm})) : at::zeros({n, nm}, x.options());
      const at::Tensor up = ku ? product(z.narrow(1, kg, ku), lut.narrow(0, r[7] + kg * nm, ku * nm).view({ku, nm})) : at::zeros({n, nm}, x.options());
      const at::Tensor h = at::silu_(gate).mul_(up).mul_(w);
      if (kd) add_out(product(h, ldv.narrow(0, r[8], kd * nm).view({kd, nm}).t()), ldut.narrow(0, r[9], kd));
      add_weighted_h(h, lowrank_channels.narrow(0, lc, nm));
    }
  }
  if (I) add_product(out, weighted_h, base_down_t);  // the shared down base once per token
  return out.to(x_in.scalar_type());
}


// RFID-MoE / MoBE (kernels/basis_residual_cpu.py documents the layout): per projection q either a dense W_e
// (stored W_eᵀ [in, out]) or W_e = A_e R_e + R̂_e, with R_e a right factor shared by a group (or MoBE's per
// expert, made at load) and R̂_e the hashed residual, regenerated here block by block (never stored).
struct Projection {
  at::Tensor dense_t, right, coef_t, eta;  // [E, in, out] (W_eᵀ) | [rows, in], [Σ K_e, out] (A_eᵀ), [m, a] (s ⊙ η)
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
// regenerated into a small buffer, each multiplied in by one GEMM.
template <typename T>
void add_residual(at::Tensor& y, const at::Tensor& inp, const at::Tensor& eta, const ResidualHash& bucket,
                  int64_t offset, int64_t full_in, int64_t row_lo, int64_t col_lo) {
  const int64_t in = inp.size(1), out = y.size(1);
  const int64_t rows = std::max<int64_t>(1, kResidualBlock / in);
  const T* e = eta.data_ptr<T>();
  at::parallel_for(0, (out + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor block = at::empty({rows, in}, eta.options());
    T* v = block.data_ptr<T>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows, nr = std::min(rows, out - r0);
      for (int64_t r = 0; r < nr; ++r) {
        const uint64_t first = static_cast<uint64_t>(offset + (row_lo + r0 + r) * full_in + col_lo);
        for (int64_t c = 0; c < in; ++c) v[r * in + c] = e[bucket(first + c)];
      }
      y.narrow(1, r0, nr).addmm_(inp, block.narrow(0, 0, nr).t());
    }
  });
}

// Σ_k w_k · expert_{id_k}(x). meta int64 [E, 11]: per expert its group, its slot in the group, then per
// projection (gate, up, down) the first row of its right factor, its rank K_e and the first row of its A_eᵀ.
// order int64 [E]: the experts in visiting order (sharers of a right factor adjacent: at decode z = R x is
// computed once per right factor). geometry int64 [3]: residual seed, full intermediate size, this rank's
// first intermediate channel.
at::Tensor basis_residual_forward(const at::Tensor& x_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                                  const at::Tensor& meta_in, const at::Tensor& order_in, const at::Tensor& geometry,
                                  const at::Tensor& gate_dense_t, const at::Tensor& gate_right,
                                  const at::Tensor& gate_coef_t, const at::Tensor& gate_eta,
                                  const at::Tensor& up_dense_t, const at::Tensor& up_right, const at::Tensor& up_coef_t,
                                  const at::Tensor& up_eta, const at::Tensor& down_dense_t,
                                  const at::Tensor& down_right, const at::Tensor& down_coef_t,
                                  const at::Tensor& down_eta) {
  const Projection projs[3] = {{gate_dense_t, gate_right, gate_coef_t, gate_eta},
                               {up_dense_t, up_right, up_coef_t, up_eta},
                               {down_dense_t, down_right, down_coef_t, down_eta}};
  const auto dtype = (gate_dense_t.numel() ? gate_dense_t : gate_coef_t).scalar_type();
  const at::Tensor x = x_in.to(dtype).contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = meta_in.size(0);
  const at::Tensor meta = meta_in.contiguous(), order = order_in.contiguous(), geo = geometry.contiguous();
  const int64_t* m = meta.data_ptr<int64_t>();
  const int64_t* g = geo.data_ptr<int64_t>();
  const int64_t full_i = g[1], lo = g[2];
  const Pairs pairs = group_pairs(topk_ids, E);
  const at::Tensor token_of = at::tensor(pairs.tokens, at::kLong);
  const at::Tensor weight_of = topk_weights.reshape({-1}).to(dtype).index_select(0, at::tensor(pairs.slots, at::kLong));
  at::Tensor out = at::zeros({T, H}, x.options());
  const bool single = T == 1;  // decode: every pair is token 0, so no gather or scatter, and z = R x is shared
  int64_t cached_row[2] = {-1, -1};
  at::Tensor cached_z[2];

  // W_e,q inp for expert e's rows inp [n, in] -> [n, out]
  auto project = [&](const at::Tensor& inp, int q, int64_t e) -> at::Tensor {
    const Projection& p = projs[q];
    if (p.dense_t.numel()) return product(inp, p.dense_t[e]);
    const int64_t* r = m + 11 * e;
    const int64_t right_row = r[2 + 3 * q], rank = r[3 + 3 * q], coef_row = r[4 + 3 * q];
    at::Tensor z;
    if (single && q < 2 && cached_row[q] == right_row) {
      z = cached_z[q];
    } else {
      z = product(inp, p.right.narrow(0, right_row, rank).t());  // [n, K]
      if (single && q < 2) cached_row[q] = right_row, cached_z[q] = z;
    }
    at::Tensor y = product(z, p.coef_t.narrow(0, coef_row, rank));  // [n, out]
    if (p.eta.numel()) {  // gate/up: rows of the full I × H matrix from lo; down: columns of H × I from lo
      const bool down = q == 2;
      const int64_t out_full = down ? H : full_i, in_full = down ? full_i : H;
      const int64_t offset = r[1] * out_full * in_full;
      const at::Tensor eta = p.eta[r[0]];
      const ResidualHash bucket(static_cast<uint64_t>(g[0]), static_cast<uint64_t>(eta.numel()));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "basis_residual_residual", [&] {
        add_residual<scalar_t>(y, inp, eta, bucket, offset, in_full, down ? 0 : lo, down ? lo : 0);
      });
    }
    return y;
  };

  const int64_t* visit = order.data_ptr<int64_t>();
  for (int64_t k = 0; k < E; ++k) {
    const int64_t e = visit[k], begin = pairs.starts[e], n = pairs.starts[e + 1] - begin;
    if (n == 0) continue;
    const at::Tensor tokens = token_of.narrow(0, begin, n);
    const at::Tensor w = weight_of.narrow(0, begin, n).unsqueeze(1);
    const at::Tensor xe = single ? x : x.index_select(0, tokens);
    at::Tensor gate = project(xe, 0, e);
    const at::Tensor h = at::silu_(gate).mul_(project(xe, 1, e)).mul_(w);  // routing weight on h
    const at::Tensor y = project(h, 2, e);
    single ? out.add_(y) : out.index_add_(0, tokens, y);
  }
  return out.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(moe_compress_cpu, m) {
  m.def("base_delta(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor meta, Tensor gu_v, Tensor gu_ut, "
        "Tensor d_v, Tensor d_ut, Tensor base_gu, Tensor base_down_t, Tensor base_channels, int num_dynamic_drop) "
        "-> Tensor");
  m.def("sparse_lowrank(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor meta, Tensor sgu, Tensor sd_t, "
        "Tensor lv, Tensor lut, Tensor ldv, Tensor ldut, Tensor base_down_t, Tensor sparse_channels, "
        "Tensor lowrank_channels) -> Tensor");
  m.def("basis_residual(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor meta, Tensor order, Tensor geometry, "
        "Tensor gate_dense_t, Tensor gate_right, Tensor gate_coef_t, Tensor gate_eta, Tensor up_dense_t, "
        "Tensor up_right, Tensor up_coef_t, Tensor up_eta, Tensor down_dense_t, Tensor down_right, Tensor down_coef_t, "
        "Tensor down_eta) "
        "-> Tensor");
  // Products with at most this many activation rows use the single-pass loops (default 8); returns the old
  // limit. Tests and benchmarks set 0 to compare with at::mm everywhere.
  m.def("set_small_row_limit(int rows) -> int", &set_small_row_limit);
  // a b through the same dispatch as the ops' products (tests and benchmarks of the loops alone).
  m.def("product(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_compress_cpu, CPU, m) {
  m.impl("base_delta", &base_delta_forward);
  m.impl("sparse_lowrank", &sparse_lowrank_forward);
  m.impl("basis_residual", &basis_residual_forward);
  m.impl("product", &product);
}
