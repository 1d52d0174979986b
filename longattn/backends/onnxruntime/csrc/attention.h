// CPU kernels for the ai.longattn nodes, float32.
//
// attend_rows: exact attention of a run of query rows against a run of keys with an online
// softmax, one (query block x key block) tile of scores at a time: O(block) memory, never S x S.
// The two products are small GEMMs on a register-blocked micro-kernel (kMR rows x 2 vectors:
// 12 x 32 floats with AVX-512, 6 x 16 with AVX2; see "portable vectors"). HyperAttention (sortLSH
// blocks + uniform key samples merged by log-sum-exp, causal by recursion on halves: Han et al.
// 2023, Alg. 1-4) and chunked linear attention are built from it. The reference for all three is
// longattn/kernels/*.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace longattn {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kRowBlock = 96;   // query rows per tile (a multiple of the micro-kernel's 12)
#ifndef LONGATTN_KEY_BLOCK
#define LONGATTN_KEY_BLOCK 512
#endif
#ifndef LONGATTN_STRIPE
#define LONGATTN_STRIPE 48
#endif
constexpr int kKeyBlock = LONGATTN_KEY_BLOCK;  // keys per tile (a multiple of the micro-kernel's 32)
constexpr int kStripe = LONGATTN_STRIPE;       // rows taken from q * k^T through softmax to p * v in L1
constexpr int kScoreStride = kKeyBlock + 16;   // not a power of two: rows of p would share L1 sets

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// --- portable vectors -------------------------------------------------------------------------
//
// One source for every vector width: GCC/Clang vector extensions, which the compiler lowers to
// AVX-512, AVX2+FMA, SSE2 or NEON by the target flags (a*b+c contracts to an FMA where the target
// has one). Other compilers, and -DLONGATTN_SCALAR (to test them), take the scalar loops.
#if defined(__GNUC__) && !defined(LONGATTN_SCALAR) && \
    (defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__) || defined(__ARM_NEON))
#define LONGATTN_VECTOR 1
#if defined(__AVX512F__)
constexpr int kLanes = 16, kMR = 12;  // 32 registers: 24 accumulators, 2 of B, 1 of A
#elif defined(__AVX__)
constexpr int kLanes = 8, kMR = 6;    // 16 registers: 12 accumulators, 2 of B, 1 of A
#else
constexpr int kLanes = 4, kMR = 6;
#endif
constexpr int kNR = 2 * kLanes;  // the micro-kernel's tile: kMR rows x 2 vectors
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
inline vfloat vload(const float* p) { vfloat v; std::memcpy(&v, p, sizeof v); return v; }  // unaligned
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline vfloat vsplat(float x) { return vfloat{} + x; }
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline float reduce_add(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float reduce_max(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
#else
constexpr int kLanes = 1, kMR = 1, kNR = 1;
#endif
constexpr int kRowMaxStride = 16;  // floats per row of gemm's row maxima: the widest vector's lanes

// --- C (+)= A * B: A (M x K, lda), B (K x N, ldb), C (M x N, ldc), all row-major ---------------

#if defined(LONGATTN_VECTOR)
template <int MR>
inline void micro_kernel(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool accumulate,
                         float* row_max) {
  vfloat c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? vload(C + r * ldc) : vfloat{};
    c1[r] = accumulate ? vload(C + r * ldc + kLanes) : vfloat{};
  }
  for (int k = 0; k < K; ++k) {
    const vfloat b0 = vload(B + (int64_t)k * ldb), b1 = vload(B + (int64_t)k * ldb + kLanes);
    for (int r = 0; r < MR; ++r) {
      const float a = A[(int64_t)r * lda + k];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    vstore(C + r * ldc, c0[r]);
    vstore(C + r * ldc + kLanes, c1[r]);
  }
  if (row_max)  // the softmax's row maxima while the tile is still in registers, lane-wise
    for (int r = 0; r < MR; ++r) {
      float* m = row_max + kRowMaxStride * r;
      vstore(m, vmax(vload(m), vmax(c0[r], c1[r])));
    }
}

template <int MR>
inline void micro_dispatch(int rows, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                           bool acc, float* mx) {
  if constexpr (MR > 1)
    if (rows < MR) return micro_dispatch<MR - 1>(rows, K, A, lda, B, ldb, C, ldc, acc, mx);
  micro_kernel<MR>(K, A, lda, B, ldb, C, ldc, acc, mx);
}
#endif

// row_max (optional, kRowMaxStride floats a row, lane-wise maxima: reduce them): raised to the max
// of each row of the product
inline void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                 bool accumulate, float* row_max = nullptr) {
  int n_fast = 0;
#if defined(LONGATTN_VECTOR)
  n_fast = N / kNR * kNR;
  for (int i = 0; i < M; i += kMR)
    for (int j = 0; j < n_fast; j += kNR)
      micro_dispatch<kMR>(std::min(kMR, M - i), K, A + (int64_t)i * lda, lda, B + j, ldb, C + (int64_t)i * ldc + j,
                          ldc, accumulate, row_max ? row_max + kRowMaxStride * i : nullptr);
#endif
  if (n_fast == N) return;
  for (int i = 0; i < M; ++i) {
    float* c = C + (int64_t)i * ldc;
    if (!accumulate)
      for (int j = n_fast; j < N; ++j) c[j] = 0.f;
    for (int k = 0; k < K; ++k) {
      const float a = A[(int64_t)i * lda + k];
      const float* b = B + (int64_t)k * ldb;
      for (int j = n_fast; j < N; ++j) c[j] += a * b[j];
    }
    if (row_max)
      for (int j = n_fast; j < N; ++j)
        row_max[kRowMaxStride * i] = std::max(row_max[kRowMaxStride * i], c[j]);
  }
}

// --- exp of non-positive arguments (softmax numerators), vectorised ----------------------------

#if defined(LONGATTN_VECTOR)
inline vfloat exp2v(vfloat x) {
  // 2^x = 2^n 2^r, n = round(x), |r| <= 1/2: 2^r by its degree-6 Taylor polynomial in r ln2
  // (rel. error < 3e-8), n added to the exponent bits. Scores are kept in log2 units (the
  // softmax scale carries log2(e)), which saves the range reduction's multiply and second step.
  // Below 2^-125 (of the row's maximum, which counts 1) the result is 0, -inf and NaN included:
  // those lanes compute garbage that the mask clears, which costs less than clamping x.
  const vint keep = x >= -125.f;
  const vfloat t = x + 12582912.f;  // 1.5 * 2^23: rounds x to an integer n, held in t's low bits (IEEE
                                    // arithmetic: -ffast-math would fold this away)
  const vfloat r = x - (t - 12582912.f);
  vfloat p = vsplat(1.5403530393381606e-4f);
  p = p * r + 1.3333558146428443e-3f;
  p = p * r + 9.6181291076284772e-3f;
  p = p * r + 5.5504108664821580e-2f;
  p = p * r + 2.4022650695910071e-1f;
  p = p * r + 6.9314718055994531e-1f;
  p = p * r + 1.f;
  vint bits, n;
  std::memcpy(&bits, &p, sizeof bits);
  std::memcpy(&n, &t, sizeof n);
  bits = (bits + (n << 23)) & keep;  // t's bits are 0x4B400000 + n; shifted by 23 only n's remain
  std::memcpy(&p, &bits, sizeof p);
  return p;
}
#endif

// s[j] <- 2^(s[j] - shift) for j < n (n a multiple of kLanes on the vector path); returns the sum.
inline float exp2_shift_sum(float* s, int n, float shift) {
  float total = 0.f;
  int j = 0;
#if defined(LONGATTN_VECTOR)
  vfloat acc{};
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat e = exp2v(vload(s + j) - shift);
    vstore(s + j, e);
    acc += e;
  }
  total = reduce_add(acc);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp2(s[j] - shift);
    total += s[j];
  }
  return total;
}

inline float row_max(const float* s, int n) {
  float m = kNegInf;
  int j = 0;
#if defined(LONGATTN_VECTOR)
  vfloat acc = vsplat(kNegInf);
  for (; j + kLanes <= n; j += kLanes) acc = vmax(acc, vload(s + j));
  m = reduce_max(acc);
#endif
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// --- exact attention of a run of rows -------------------------------------------------------

// An additive mask for one (batch, head): element (i, j) at data[i * stride_q + j * stride_k].
struct MaskView {
  const float* data = nullptr;
  int64_t stride_q = 0, stride_k = 0;
};

struct Workspace {
  std::vector<float> q, kt, scores, out, m, l;
};

// Keys packed transposed in panels of 32: panel p holds keys 32p..32p+31 as a contiguous
// (D x 32) block, zero-padded. The B operand of q * k^T then streams through memory; a plain
// (D x nk) transpose has a power-of-two row stride that thrashes the L1 cache's sets.
constexpr int kPanel = 32;
inline void pack_keys_panels(const float* K, int64_t ldk, int64_t nk, int D, float* kt) {
  const int64_t panels = round_up(std::max<int64_t>(nk, 1), kPanel) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {  // one (32 x D) block of keys -> one (D x 32) panel
    float* panel = kt + p * D * kPanel;
    const int64_t j0 = p * kPanel, width = std::min<int64_t>(kPanel, nk - j0);
    for (int d = 0; d < D; ++d) {
      float* row = panel + (int64_t)d * kPanel;
      for (int64_t jj = 0; jj < width; ++jj) row[jj] = K[(j0 + jj) * ldk + d];
      for (int64_t jj = width; jj < kPanel; ++jj) row[jj] = 0.f;
    }
  }
}
inline void pack_keys_transposed(const float* K, int64_t ldk, int64_t nk, int D, std::vector<float>& kt,
                                 int64_t& ldkt) {
  ldkt = round_up(std::max<int64_t>(nk, 1), kPanel);
  kt.resize((size_t)D * ldkt);
  pack_keys_panels(K, ldk, nk, D, kt.data());
}

// out[i] = softmax_j(scale q_i . k_j + mask_ij) v_j over keys j < nk visible to query i, where
// query i (global position q_pos0 + i) sees key j iff j <= q_pos0 + i + causal_offset when
// causal. lse[i] (if given) is the log-sum-exp of the row (-inf when it saw no key, out = 0).
// Q (nq x D, ldq), Kt packed by pack_keys_panels (ldkt: keys rounded up to 32), V (nk x Dv,
// ldv); out (nq x Dv, ldo).
inline void attend_rows(const float* Q, int64_t ldq, int64_t nq, int D, float scale, const float* Kt, int64_t ldkt,
                        const float* V, int64_t ldv, int64_t nk, int Dv, const MaskView& mask, bool causal,
                        int64_t q_pos0, int64_t causal_offset, float* out, int64_t ldo, float* lse, Workspace& ws) {
  const int64_t dvp = round_up(Dv, 32);
  ws.q.resize((size_t)kRowBlock * D);
  ws.scores.resize((size_t)kRowBlock * kScoreStride);
  ws.out.resize((size_t)kRowBlock * dvp);
  ws.m.resize(kRowBlock);
  ws.l.resize(kRowBlock);
  for (int64_t r0 = 0; r0 < nq; r0 += kRowBlock) {
    const int rows = (int)std::min<int64_t>(kRowBlock, nq - r0);
    // scale and log2(e) folded into q: one multiply per q element, not per score
    const float q_scale = scale * 1.44269504088896341f;
    for (int r = 0; r < rows; ++r)
      for (int d = 0; d < D; ++d) ws.q[(size_t)r * D + d] = Q[(r0 + r) * ldq + d] * q_scale;
    std::fill(ws.out.begin(), ws.out.end(), 0.f);
    std::fill(ws.m.begin(), ws.m.end(), kNegInf);
    std::fill(ws.l.begin(), ws.l.end(), 0.f);
    int64_t key_end = nk;
    if (causal) key_end = std::min<int64_t>(nk, q_pos0 + r0 + rows - 1 + causal_offset + 1);
    for (int64_t k0 = 0; k0 < key_end; k0 += kKeyBlock) {
      const int kb = (int)std::min<int64_t>(kKeyBlock, key_end - k0);
      const int kbp = (int)round_up(kb, 32);
      // a stripe of rows at a time: its scores stay in L1 from q * k^T through softmax to p * v
      for (int s0 = 0; s0 < rows; s0 += kStripe) {
        const int srows = std::min(kStripe, rows - s0);
        float* stripe = ws.scores.data() + (size_t)s0 * kScoreStride;
        // the products' row maxima are the softmax's when nothing is added or hidden afterwards
        const bool plain = !mask.data && kb == kbp &&
                           (!causal || q_pos0 + r0 + s0 + causal_offset >= k0 + kb - 1);
        float block_max[kStripe * kRowMaxStride];
        std::fill(block_max, block_max + kRowMaxStride * srows, kNegInf);
        for (int p = 0; p < kbp; p += kPanel)
          gemm(srows, kPanel, D, ws.q.data() + (size_t)s0 * D, D, Kt + (k0 + p) * D, kPanel, stripe + p, kScoreStride,
               false, plain ? block_max : nullptr);
        for (int r = s0; r < s0 + srows; ++r) {
          float* s = ws.scores.data() + (size_t)r * kScoreStride;
          const float* lanes = block_max + kRowMaxStride * (r - s0);
          float mx = plain ? *std::max_element(lanes, lanes + kRowMaxStride) : kNegInf;
          if (!plain) {
            if (mask.data) {  // additive mask, in log2 units like the scores
              const float* mrow = mask.data + (r0 + r) * mask.stride_q + k0 * mask.stride_k;
              for (int j = 0; j < kb; ++j) s[j] += mrow[j * mask.stride_k] * 1.44269504088896341f;
            }
            int visible = kb;
            if (causal) visible = (int)std::clamp<int64_t>(q_pos0 + r0 + r + causal_offset + 1 - k0, 0, kb);
            for (int j = visible; j < kbp; ++j) s[j] = kNegInf;
            mx = row_max(s, kbp);
          }
          const float m_new = std::max(ws.m[r], mx);
          if (m_new == kNegInf) {  // nothing visible yet in this row
            std::fill(s, s + kbp, 0.f);
            continue;
          }
          const float correction = std::exp2(ws.m[r] - m_new);
          ws.l[r] = ws.l[r] * correction + exp2_shift_sum(s, kbp, m_new);
          if (correction != 1.f) {
            float* o = ws.out.data() + (size_t)r * dvp;
            for (int d = 0; d < Dv; ++d) o[d] *= correction;
          }
          ws.m[r] = m_new;
        }
        gemm(srows, Dv, kb, stripe, kScoreStride, V + k0 * ldv, (int)ldv, ws.out.data() + (size_t)s0 * dvp, (int)dvp,
             true);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const float l = ws.l[r];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      float* dst = out + (r0 + r) * ldo;
      const float* o = ws.out.data() + (size_t)r * dvp;
      for (int d = 0; d < Dv; ++d) dst[d] = o[d] * inv;
      if (lse) lse[r0 + r] = l > 0.f ? (ws.m[r] + std::log2(l)) * 0.69314718055994531f : kNegInf;  // natural log
    }
  }
}

// Whether every element is finite (no NaN, no inf); for a mask, -inf is allowed (a hidden key).
inline bool all_finite(const float* x, int64_t n, bool allow_neg_inf = false) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]) && !(allow_neg_inf && x[i] == kNegInf)) return false;
  return true;
}

// Exact attention of one head in plain IEEE arithmetic, for inputs holding NaN or inf: the fast paths'
// exponentials clamp their arguments, which turned such rows into numbers where eager attention gives NaN.
// As in eager's softmax then p @ v, every key's probability multiplies its value, zeros included (0 * NaN is
// NaN). A row that sees no key gives 0, as the fast paths do.
inline void plain_attention(const float* Q, const float* K, const float* V, int64_t Sq, int64_t Sk, int D, int Dv,
                            float scale, const MaskView& mask, bool causal, float* out) {
  std::vector<double> p((size_t)Sk);
  const int64_t off = Sk - Sq;
  for (int64_t i = 0; i < Sq; ++i) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < Sk; ++j) {
      double s = 0.0;
      for (int d = 0; d < D; ++d) s += (double)Q[i * D + d] * K[j * D + d];
      s *= scale;
      if (mask.data) s += mask.data[i * mask.stride_q + j * mask.stride_k];
      if (causal && j > i + off) s = -std::numeric_limits<double>::infinity();
      p[(size_t)j] = s;
      m = std::isnan(s) || std::isnan(m) ? std::numeric_limits<double>::quiet_NaN() : std::max(m, s);
    }
    float* o = out + i * Dv;
    if (m == -std::numeric_limits<double>::infinity()) { std::fill(o, o + Dv, 0.f); continue; }
    double l = 0.0;
    for (double& x : p) l += (x = std::exp(x - m));  // NaN when m is NaN or +inf, as in eager
    for (int d = 0; d < Dv; ++d) {
      double acc = 0.0;
      for (int64_t j = 0; j < Sk; ++j) acc += p[(size_t)j] * V[j * Dv + d];
      o[d] = (float)(acc / l);
    }
  }
}

// Merge (out_b, lse_b) into (out_a, lse_a) row-wise: attention over the union of two key sets.
inline void merge_by_lse(float* out_a, float* lse_a, const float* out_b, const float* lse_b, int64_t n, int Dv,
                         int64_t ldo_a, int64_t ldo_b) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = lse_a[i], b = lse_b[i];
    const float m = std::max(a, b);
    if (m == kNegInf) continue;
    const float wa = std::exp(a - m), wb = std::exp(b - m), total = wa + wb;
    float* oa = out_a + i * ldo_a;
    const float* ob = out_b + i * ldo_b;
    for (int d = 0; d < Dv; ++d) oa[d] = (oa[d] * wa + ob[d] * wb) / total;
    lse_a[i] = m + std::log(total);
  }
}

// --- HyperAttention ---------------------------------------------------------------------------
//
// The pattern of longattn/kernels/hyper/pattern.py (read it for the definition), per query row i at
// key position p_i = i + Sk - Sq:
//  * exact keys X_i: the first `sinks` keys and the range [lo_i, hi_i) (the causal recursion's
//    leaves and, for variant "default", the local window), each key once;
//  * per rectangle (queries x keys) holding the row: queries and keys stably sorted by their LSH
//    bucket's Gray rank, cut into nb = ceil(kl / block_size) balanced blocks; the row attends its
//    block's keys (weight 1) and `sample_size` samples of the rectangle's keys outside its block:
//    uniform (weight kl / m; the default variant stratifies them), or by importance (the default
//    variant's default: stratified draws from p = ½ softmax(scale q̄·k) + ½ / kl, q̄ the mean of the
//    group's queries over 256 evenly spaced rows of the rectangle, weight 1 / (m p)); keys of X_i are
//    skipped in both.
// All parts meet in one online softmax per row. Randomness (hyperplanes, samples) comes from
// std::mt19937_64 seeded with `seed` per key head: the same algorithm as the PyTorch kernel, not
// the same random draws.

struct HyperParams {
  int64_t block_size = 256, sample_size = 256, lsh_bits = 7, min_seq_len = 4096, sink_tokens = 64,
          local_window = 256;
  bool paper = false, importance = false;
  uint64_t seed = 0;
};

struct Rect { int64_t qs, ql, ks, kl; };

// Rectangles per recursion level and the causal leaves (query start, length), as plan_rectangles.
inline void plan_rectangles(int64_t sq, int64_t sk, bool causal, int64_t min_seq_len,
                            std::vector<std::vector<Rect>>& levels, std::vector<std::pair<int64_t, int64_t>>& leaves) {
  if (!causal) { levels.push_back({Rect{0, sq, 0, sk}}); return; }
  const int64_t off = sk - sq;
  if (off > 0) levels.push_back({Rect{0, sq, 0, off}});
  std::vector<std::pair<int64_t, int64_t>> segments;
  if (sq > 0) segments.push_back({0, sq});
  while (!segments.empty()) {
    std::vector<Rect> level;
    std::vector<std::pair<int64_t, int64_t>> next;
    for (auto [start, length] : segments) {
      // a causal segment of at most min_seq_len is one exact leaf, as in the authors' code
      if (length <= std::max<int64_t>(min_seq_len, 1)) { leaves.push_back({start, length}); continue; }
      const int64_t h = length / 2;
      level.push_back(Rect{start + h, length - h, off + start, h});
      next.push_back({start, h});
      next.push_back({start + h, length - h});
    }
    if (!level.empty()) levels.push_back(level);
    segments = next;
  }
}

// Per-row online-softmax state of one head, scores in log2 units.
struct RowState {
  std::vector<float> m, l, acc;
  int Dv = 0;
  void reset(int64_t rows, int dv) {
    Dv = dv;
    m.assign(rows, kNegInf);
    l.assign(rows, 0.f);
    acc.assign((size_t)rows * dv, 0.f);
  }
};

// Which keys a row takes: original key index o is kept iff vis_lo[r] <= o < vis_hi[r] and not
// (o < ex_sinks or ex_lo[r] <= o < ex_hi[r]). Arrays are per local row; null means no bound.
struct KeyFilter {
  const int64_t *vis_lo = nullptr, *vis_hi = nullptr, *ex_lo = nullptr, *ex_hi = nullptr;
  int64_t ex_sinks = 0;
};

// Accumulate rows (pre-scaled queries, Q rows of D; their state rows `row_ids`) against keys packed
// by pack_keys_panels (Kt) with values V (nk x Dv, contiguous) whose original indices are key_ids
// (or key_base + j), each score raised by log2_weight.
inline void accumulate_rows(const float* Q, int64_t nq, const int64_t* row_ids, int D, const float* Kt,
                            const float* V, int64_t nk, const int64_t* key_ids, int64_t key_base,
                            const KeyFilter& f, float log2_weight, RowState& st, Workspace& ws,
                            const float* key_log2w = nullptr) {
  const int Dv = st.Dv;
  const int64_t dvp = round_up(Dv, 32);
  ws.scores.resize((size_t)kStripe * kScoreStride);
  ws.out.resize((size_t)kStripe * dvp);
  for (int64_t r0 = 0; r0 < nq; r0 += kStripe) {
    const int rows = (int)std::min<int64_t>(kStripe, nq - r0);
    for (int64_t k0 = 0; k0 < nk; k0 += kKeyBlock) {
      const int kb = (int)std::min<int64_t>(kKeyBlock, nk - k0), kbp = (int)round_up(kb, 32);
      for (int p = 0; p < kbp; p += kPanel)
        gemm(rows, kPanel, D, Q + r0 * D, D, Kt + (k0 + p) * D, kPanel, ws.scores.data() + p, kScoreStride, false);
      bool any = false;
      for (int r = 0; r < rows; ++r) {
        float* s = ws.scores.data() + (size_t)r * kScoreStride;
        const int64_t lr = r0 + r, row = row_ids[lr];
        if (!key_ids && !f.ex_lo && f.ex_sinks == 0) {  // contiguous keys, a visible range per row
          int lo = 0, hi = kb;
          if (f.vis_lo) {
            lo = (int)std::clamp<int64_t>(f.vis_lo[lr] - key_base - k0, 0, kb);
            hi = (int)std::clamp<int64_t>(f.vis_hi[lr] - key_base - k0, lo, kb);
          }
          for (int j = 0; j < lo; ++j) s[j] = kNegInf;
          if (log2_weight != 0.f)
            for (int j = lo; j < hi; ++j) s[j] += log2_weight;
          for (int j = hi; j < kb; ++j) s[j] = kNegInf;
        } else {
          for (int j = 0; j < kb; ++j) {
            const int64_t o = key_ids ? key_ids[k0 + j] : key_base + k0 + j;
            bool keep = true;
            if (f.vis_lo && (o < f.vis_lo[lr] || o >= f.vis_hi[lr])) keep = false;
            if (o < f.ex_sinks || (f.ex_lo && o >= f.ex_lo[lr] && o < f.ex_hi[lr])) keep = false;
            s[j] = keep ? s[j] + log2_weight + (key_log2w ? key_log2w[k0 + j] : 0.f) : kNegInf;
          }
        }
        for (int j = kb; j < kbp; ++j) s[j] = kNegInf;
        const float m_new = std::max(st.m[row], row_max(s, kbp));
        if (m_new == kNegInf) { std::fill(s, s + kbp, 0.f); continue; }
        any = true;
        const float correction = std::exp2(st.m[row] - m_new);
        st.l[row] = st.l[row] * correction + exp2_shift_sum(s, kbp, m_new);
        if (correction != 1.f)
          for (int d = 0; d < Dv; ++d) st.acc[(size_t)row * Dv + d] *= correction;
        st.m[row] = m_new;
      }
      if (!any) continue;
      gemm(rows, Dv, kb, ws.scores.data(), kScoreStride, V + k0 * Dv, Dv, ws.out.data(), (int)dvp, false);
      for (int r = 0; r < rows; ++r) {
        float* a = st.acc.data() + (size_t)row_ids[r0 + r] * Dv;
        const float* o = ws.out.data() + (size_t)r * dvp;
        for (int d = 0; d < Dv; ++d) a[d] += o[d];
      }
    }
  }
}

// Angular LSH bucket of each row as its Gray rank (neighbouring ranks differ in one hyperplane).
inline void lsh_ranks(const float* X, int64_t n, int D, const std::vector<float>& planes, int bits,
                      std::vector<int64_t>& rank) {
  rank.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    int64_t code = 0;
    for (int b = 0; b < bits; ++b) {
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot += X[i * D + d] * planes[(size_t)b * D + d];
      code |= (int64_t)(dot > 0.f) << b;
    }
    int64_t r = code;
    for (int shift = 1; shift < 32; shift *= 2) r ^= r >> shift;
    rank[i] = r;
  }
}

inline void gather_rows(const float* X, int64_t ld, const int64_t* idx, int64_t n, int D, std::vector<float>& dst) {
  dst.resize((size_t)std::max<int64_t>(n, 1) * D);
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst.data() + i * D, X + idx[i] * ld, sizeof(float) * D);
}

// HyperAttention of the query heads [h0, h0 + group) of one batch against one key/value head.
// Q: (group, Sq, D) rows, K (Sk, D), V (Sk, Dv), out (group, Sq, Dv); contiguous.
inline void hyper_attention_heads(const float* Q, int group, int64_t Sq, const float* K, const float* V, int64_t Sk,
                                  int D, int Dv, float scale, bool causal, const HyperParams& p, uint64_t stream,
                                  float* out, Workspace& ws) {
  const int64_t off = Sk - Sq;
  std::vector<std::vector<Rect>> levels;
  std::vector<std::pair<int64_t, int64_t>> leaves;
  plan_rectangles(Sq, Sk, causal, p.min_seq_len, levels, leaves);
  // exact ranges (exact_ranges in pattern.py) and sinks
  const int64_t window = p.paper ? 0 : p.local_window, sinks = p.paper ? 0 : std::min(p.sink_tokens, Sk);
  std::vector<int64_t> lo(Sq), hi(Sq);
  for (int64_t i = 0; i < Sq; ++i) {
    const int64_t pos = i + off;
    if (causal) { lo[i] = pos + 1; hi[i] = pos + 1; }
    else if (window > 0) { lo[i] = pos - window / 2; hi[i] = lo[i] + window; }
    else { lo[i] = 0; hi[i] = 0; }
  }
  if (causal) {
    for (auto [start, length] : leaves)
      for (int64_t i = start; i < start + length; ++i) lo[i] = off + start;
    if (window > 0)
      for (int64_t i = 0; i < Sq; ++i) lo[i] = std::min(lo[i], i + off - window + 1);
  }
  for (int64_t i = 0; i < Sq; ++i) {
    lo[i] = std::clamp<int64_t>(lo[i], 0, Sk);
    hi[i] = std::max(lo[i], std::clamp<int64_t>(hi[i], 0, Sk));
  }
  // hyperplanes and samples belong to the key head
  std::mt19937_64 rng(p.seed * 0x9E3779B97F4A7C15ull + stream);
  std::normal_distribution<float> normal;
  const int bits = (int)std::clamp<int64_t>(p.lsh_bits, 1, 16);
  std::vector<float> planes((size_t)bits * D);
  for (float& x : planes) x = normal(rng);
  std::vector<int64_t> k_rank;
  lsh_ranks(K, Sk, D, planes, bits, k_rank);
  std::vector<std::vector<std::vector<int64_t>>> samples(levels.size());
  std::vector<std::vector<std::vector<float>>> sample_log2w(levels.size());  // log2 of the keys each stands for
  std::vector<double> qbar, cdf;
  for (size_t lv = 0; lv < levels.size(); ++lv)
    for (const Rect& rc : levels[lv]) {
      std::uniform_real_distribution<double> unit(0.0, 1.0);
      std::vector<int64_t> s(rc.kl > 0 ? p.sample_size : 0);
      const double m = (double)std::max<int64_t>(p.sample_size, 1);
      std::vector<float> lw(s.size(), (float)std::log2((double)rc.kl / m));
      if (p.importance && !s.empty()) {
        // q̄: the group's queries averaged over 256 evenly spaced rows (pattern.py, mean_query_rows)
        qbar.assign(D, 0.0);
        for (int g = 0; g < group; ++g)
          for (int t = 0; t < 256; ++t) {
            const int64_t row = rc.qs + (int64_t)(((double)t + 0.5) / 256.0 * (double)rc.ql);
            const float* qr = Q + ((int64_t)g * Sq + row) * D;
            for (int d = 0; d < D; ++d) qbar[d] += qr[d];
          }
        cdf.resize(rc.kl);
        double top = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < rc.kl; ++j) {
          const float* kr = K + (rc.ks + j) * D;
          double dot = 0.0;
          for (int d = 0; d < D; ++d) dot += qbar[d] * kr[d];
          cdf[j] = dot * scale / ((double)group * 256.0);
          top = std::max(top, cdf[j]);
        }
        double mass = 0.0;
        for (double& x : cdf) mass += (x = std::exp(x - top));
        double run = 0.0;
        for (double& x : cdf) x = (run += 0.5 * x / mass + 0.5 / (double)rc.kl);
        for (size_t t = 0; t < s.size(); ++t) {
          // stratified uniforms through p's inverse CDF; each sample weighs 1 / (m p) of its key
          const double x = ((double)t + unit(rng)) / m * run;
          const int64_t j = std::min<int64_t>(rc.kl - 1, std::upper_bound(cdf.begin(), cdf.end(), x) - cdf.begin());
          const double step = cdf[j] - (j > 0 ? cdf[j - 1] : 0.0);
          s[t] = rc.ks + j;
          lw[t] = (float)std::log2(run / (m * step));
        }
      } else {
        for (size_t t = 0; t < s.size(); ++t) {
          // the default variant stratifies: one uniform draw in each of m equal slices of the keys
          // (each key still drawn with probability m / kl); the paper's are i.i.d. uniform
          const double u = p.paper ? unit(rng) : ((double)t + unit(rng)) / m;
          s[t] = rc.ks + std::min<int64_t>(rc.kl - 1, (int64_t)std::floor(u * (double)rc.kl));
        }
      }
      samples[lv].push_back(std::move(s));
      sample_log2w[lv].push_back(std::move(lw));
    }
  const float log2e = 1.44269504088896341f;
  std::vector<float> qs((size_t)Sq * D), qg, kg, vg, kt, gathered_log2w;
  std::vector<int64_t> q_rank, ids(Sq), row_lo, row_hi, ex_lo, ex_hi, gathered_rows, gathered_keys;
  std::iota(ids.begin(), ids.end(), 0);
  RowState st;
  for (int g = 0; g < group; ++g) {
    const float* qh = Q + (int64_t)g * Sq * D;
    for (int64_t i = 0; i < Sq * D; ++i) qs[i] = qh[i] * scale * log2e;
    st.reset(Sq, Dv);
    // exact part: the sinks, then each row's range above the sinks
    if (sinks > 0) {
      row_lo.assign(Sq, 0);
      row_hi.resize(Sq);
      for (int64_t i = 0; i < Sq; ++i) row_hi[i] = causal ? std::min(sinks, i + off + 1) : sinks;
      int64_t ldkt;
      pack_keys_transposed(K, D, sinks, D, kt, ldkt);
      KeyFilter f;
      f.vis_lo = row_lo.data(); f.vis_hi = row_hi.data();
      accumulate_rows(qs.data(), Sq, ids.data(), D, kt.data(), V, sinks, nullptr, 0, f, 0.f, st, ws);
    }
    for (int64_t r0 = 0; r0 < Sq; r0 += kRowBlock) {
      const int64_t rows = std::min<int64_t>(kRowBlock, Sq - r0);
      int64_t span_lo = Sk, span_hi = 0;
      row_lo.resize(rows); row_hi.resize(rows);
      for (int64_t r = 0; r < rows; ++r) {
        row_lo[r] = std::max(lo[r0 + r], sinks);
        row_hi[r] = hi[r0 + r];
        if (row_hi[r] > row_lo[r]) { span_lo = std::min(span_lo, row_lo[r]); span_hi = std::max(span_hi, row_hi[r]); }
      }
      if (span_hi <= span_lo) continue;
      int64_t ldkt;
      pack_keys_transposed(K + span_lo * D, D, span_hi - span_lo, D, kt, ldkt);
      KeyFilter f;
      f.vis_lo = row_lo.data(); f.vis_hi = row_hi.data();
      accumulate_rows(qs.data() + r0 * D, rows, ids.data() + r0, D, kt.data(), V + span_lo * Dv, span_hi - span_lo,
                      nullptr, span_lo, f, 0.f, st, ws);
    }
    // rectangles: LSH blocks and samples, skipping each row's exact keys
    lsh_ranks(qs.data(), Sq, D, planes, bits, q_rank);  // scaling q does not change its bucket
    for (size_t lv = 0; lv < levels.size(); ++lv)
      for (size_t ri = 0; ri < levels[lv].size(); ++ri) {
        const Rect rc = levels[lv][ri];
        if (rc.ql <= 0 || rc.kl <= 0) continue;
        std::vector<int64_t> q_order(rc.ql), k_order(rc.kl), k_pos(rc.kl);
        std::iota(q_order.begin(), q_order.end(), rc.qs);
        std::iota(k_order.begin(), k_order.end(), rc.ks);
        std::stable_sort(q_order.begin(), q_order.end(), [&](int64_t a, int64_t b) { return q_rank[a] < q_rank[b]; });
        std::stable_sort(k_order.begin(), k_order.end(), [&](int64_t a, int64_t b) { return k_rank[a] < k_rank[b]; });
        for (int64_t t = 0; t < rc.kl; ++t) k_pos[k_order[t] - rc.ks] = t;
        const int64_t nb = std::max<int64_t>(1, (rc.kl + p.block_size - 1) / p.block_size);
        const auto& smp = samples[lv][ri];
        const auto& smp_log2w = sample_log2w[lv][ri];
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t q_lo = b * rc.ql / nb, q_hi = (b + 1) * rc.ql / nb;
          const int64_t k_lo = b * rc.kl / nb, k_hi = (b + 1) * rc.kl / nb;
          if (q_hi <= q_lo) continue;
          gathered_rows.assign(q_order.begin() + q_lo, q_order.begin() + q_hi);
          const int64_t n_q = (int64_t)gathered_rows.size();
          gather_rows(qs.data(), D, gathered_rows.data(), n_q, D, qg);
          ex_lo.resize(n_q); ex_hi.resize(n_q);
          for (int64_t r = 0; r < n_q; ++r) { ex_lo[r] = lo[gathered_rows[r]]; ex_hi[r] = hi[gathered_rows[r]]; }
          KeyFilter f;
          f.ex_lo = ex_lo.data(); f.ex_hi = ex_hi.data(); f.ex_sinks = sinks;
          // the block's keys, weight 1
          gathered_keys.assign(k_order.begin() + k_lo, k_order.begin() + k_hi);
          if (!gathered_keys.empty()) {
            gather_rows(K, D, gathered_keys.data(), (int64_t)gathered_keys.size(), D, kg);
            gather_rows(V, Dv, gathered_keys.data(), (int64_t)gathered_keys.size(), Dv, vg);
            int64_t ldkt;
            pack_keys_transposed(kg.data(), D, (int64_t)gathered_keys.size(), D, kt, ldkt);
            accumulate_rows(qg.data(), n_q, gathered_rows.data(), D, kt.data(), vg.data(),
                            (int64_t)gathered_keys.size(), gathered_keys.data(), 0, f, 0.f, st, ws);
          }
          // samples outside the block, each with its weight
          gathered_keys.clear();
          gathered_log2w.clear();
          for (size_t si = 0; si < smp.size(); ++si) {
            const int64_t t = k_pos[smp[si] - rc.ks];
            if (((t + 1) * nb - 1) / rc.kl != b) {  // block_of_rank
              gathered_keys.push_back(smp[si]);
              gathered_log2w.push_back(smp_log2w[si]);
            }
          }
          if (!gathered_keys.empty()) {
            gather_rows(K, D, gathered_keys.data(), (int64_t)gathered_keys.size(), D, kg);
            gather_rows(V, Dv, gathered_keys.data(), (int64_t)gathered_keys.size(), Dv, vg);
            int64_t ldkt;
            pack_keys_transposed(kg.data(), D, (int64_t)gathered_keys.size(), D, kt, ldkt);
            accumulate_rows(qg.data(), n_q, gathered_rows.data(), D, kt.data(), vg.data(),
                            (int64_t)gathered_keys.size(), gathered_keys.data(), 0, f, 0.f, st, ws,
                            gathered_log2w.data());
          }
        }
      }
    float* oh = out + (int64_t)g * Sq * Dv;
    for (int64_t i = 0; i < Sq; ++i) {
      const float inv = st.l[i] > 0.f ? 1.f / st.l[i] : 0.f;
      for (int d = 0; d < Dv; ++d) oh[i * Dv + d] = st.acc[(size_t)i * Dv + d] * inv;
    }
  }
}

// --- linear attention -------------------------------------------------------------------------
//
// longattn/kernels/linear/reference.py, additive rule: row i stands at key position p_i (i + Sk - Sq
// causal, Sk - 1 otherwise) and sees exact keys (the first `sink_tokens` and the `local_window` most
// recent, j in (p - W, p], weight exp(scale q.k_j)) and far keys (every other visible key, weight
// exp(log_scale) phi(q).phi(k_j)) under one normaliser: out = sum_j w_j v_j / (sum_j w_j + eps).

struct LinearParams {
  std::string feature_map = "elu";  // elu, relu, identity, favor, taylor2, none
  int64_t num_features = 256, sink_tokens = 0, local_window = 0;
  float eps = 1e-6f;
  uint64_t seed = 0;
};

// phi(X) (n x F) and the natural-log scale of each row's features (favor: the true features are
// exp(log_scale) * phi; others 0). Maps as in longattn/kernels/linear/feature_maps.py: elu, relu
// and identity take x as it is; favor and taylor2 take x sqrt(scale).
inline int feature_rows(const float* X, int64_t n, int D, const LinearParams& p, float scale,
                        const std::vector<float>& w, bool is_query, std::vector<float>& phi,
                        std::vector<float>& log_scale) {
  log_scale.assign(n, 0.f);
  const std::string& map = p.feature_map;
  if (map == "none") { phi.clear(); return 0; }
  if (map == "favor") {  // positive random features: E[phi(q).phi(k)] = exp(scale q.k)
    const int F = (int)p.num_features;
    const float root = std::sqrt(scale);
    phi.resize((size_t)n * F);
    float shared = kNegInf;
    for (int64_t i = 0; i < n; ++i) {
      float nn = 0.f;
      for (int d = 0; d < D; ++d) nn += X[i * D + d] * X[i * D + d];
      float row = kNegInf;
      for (int f = 0; f < F; ++f) {
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += w[(size_t)f * D + d] * X[i * D + d];
        phi[i * F + f] = dot * root - 0.5f * nn * scale;
        row = std::max(row, phi[i * F + f]);
      }
      log_scale[i] = row;
      shared = std::max(shared, row);
    }
    // queries: each row by its own maximum; keys: one shift for all (it must be common to them)
    const float inv = 1.f / std::sqrt((float)F);
    for (int64_t i = 0; i < n; ++i) {
      const float shift = is_query ? log_scale[i] : shared;
      log_scale[i] = shift;
      for (int f = 0; f < F; ++f) phi[i * F + f] = std::exp(phi[i * F + f] - shift) * inv;
    }
    return F;
  }
  if (map == "taylor2") {  // [1, x, x_a^2/sqrt2, x_a x_b (a<b)]: phi(q).phi(k) = 1 + s + s^2/2
    const int F = 1 + D + D * (D + 1) / 2;
    const float root = std::sqrt(scale), half = 1.f / std::sqrt(2.f);
    phi.resize((size_t)n * F);
    for (int64_t i = 0; i < n; ++i) {
      float* o = phi.data() + i * F;
      const float* x = X + i * D;
      int t = 0;
      o[t++] = 1.f;
      for (int a = 0; a < D; ++a) o[t++] = x[a] * root;
      for (int a = 0; a < D; ++a)
        for (int b = a; b < D; ++b) o[t++] = x[a] * root * x[b] * root * (a == b ? half : 1.f);
    }
    return F;
  }
  phi.resize((size_t)n * D);
  for (int64_t i = 0; i < n * D; ++i) {
    const float x = X[i];
    phi[i] = map == "relu" ? std::max(x, 0.f) : map == "identity" ? x : (x > 0.f ? x + 1.f : std::exp(x));
  }
  return D;
}

// The query heads [0, group) of one key head. Q (group, Sq, D), K (Sk, D), V (Sk, Dv), out (group, Sq, Dv).
inline void linear_attention_heads(const float* Q, int group, int64_t Sq, const float* K, const float* V, int64_t Sk,
                                   int D, int Dv, float scale, bool causal, const LinearParams& p, uint64_t stream,
                                   float* out, Workspace& ws) {
  std::vector<float> w;
  if (p.feature_map == "favor") {
    std::mt19937_64 rng(p.seed * 0x9E3779B97F4A7C15ull + stream);
    std::normal_distribution<float> normal;
    w.resize((size_t)p.num_features * D);
    for (float& x : w) x = normal(rng);
  }
  const int64_t off = Sk - Sq, sinks = std::min(p.sink_tokens, Sk), W = p.local_window;
  std::vector<float> pk, lk, pq, lq, state, z, num(Dv), qs((size_t)Sq * D), kt;
  const int F = feature_rows(K, Sk, D, p, scale, w, false, pk, lk);
  const float key_log_scale = Sk > 0 ? lk[0] : 0.f;
  std::vector<int64_t> ids(Sq), row_lo(Sq), row_hi(Sq);
  std::iota(ids.begin(), ids.end(), 0);
  RowState st;
  const float log2e = 1.44269504088896341f, ln2 = 0.69314718055994531f;
  for (int g = 0; g < group; ++g) {
    const float* qh = Q + (int64_t)g * Sq * D;
    feature_rows(qh, Sq, D, p, scale, w, true, pq, lq);
    st.reset(Sq, Dv);
    auto pos = [&](int64_t i) { return causal ? i + off : Sk - 1; };
    if (sinks > 0 || W > 0) {  // the exact keys, as softmax attention
      for (int64_t i = 0; i < Sq * D; ++i) qs[i] = qh[i] * scale * log2e;
      if (sinks > 0) {
        for (int64_t i = 0; i < Sq; ++i) { row_lo[i] = 0; row_hi[i] = std::min(sinks, pos(i) + 1); }
        int64_t ldkt;
        pack_keys_transposed(K, D, sinks, D, kt, ldkt);
        KeyFilter f;
        f.vis_lo = row_lo.data(); f.vis_hi = row_hi.data();
        accumulate_rows(qs.data(), Sq, ids.data(), D, kt.data(), V, sinks, nullptr, 0, f, 0.f, st, ws);
      }
      for (int64_t r0 = 0; r0 < Sq && W > 0; r0 += kRowBlock) {
        const int64_t rows = std::min<int64_t>(kRowBlock, Sq - r0);
        int64_t span_lo = Sk, span_hi = 0;
        for (int64_t r = r0; r < r0 + rows; ++r) {
          row_lo[r] = std::clamp<int64_t>(std::max(pos(r) - W + 1, sinks), 0, Sk);
          row_hi[r] = std::clamp<int64_t>(pos(r) + 1, 0, Sk);
          if (row_hi[r] > row_lo[r]) { span_lo = std::min(span_lo, row_lo[r]); span_hi = std::max(span_hi, row_hi[r]); }
        }
        if (span_hi <= span_lo) continue;
        int64_t ldkt;
        pack_keys_transposed(K + span_lo * D, D, span_hi - span_lo, D, kt, ldkt);
        KeyFilter f;
        f.vis_lo = row_lo.data() + r0; f.vis_hi = row_hi.data() + r0;
        accumulate_rows(qs.data() + r0 * D, rows, ids.data() + r0, D, kt.data(), V + span_lo * Dv,
                        span_hi - span_lo, nullptr, span_lo, f, 0.f, st, ws);
      }
    }
    // far keys j in [sinks, p - W]: a running state, the keys absorbed in order (rows by position)
    state.assign((size_t)F * Dv, 0.f);
    z.assign(F, 0.f);
    int64_t absorbed = sinks;
    float* oh = out + (int64_t)g * Sq * Dv;
    for (int64_t i = 0; i < Sq; ++i) {
      const int64_t far_end = std::clamp<int64_t>(pos(i) - W + 1, sinks, Sk);
      for (; absorbed < far_end; ++absorbed)
        for (int f = 0; f < F; ++f) {
          const float a = pk[absorbed * F + f];
          z[f] += a;
          float* srow = state.data() + (size_t)f * Dv;
          const float* vrow = V + absorbed * Dv;
          for (int d = 0; d < Dv; ++d) srow[d] += a * vrow[d];
        }
      std::fill(num.begin(), num.end(), 0.f);
      float den = 0.f;
      for (int f = 0; f < F && absorbed > sinks; ++f) {
        const float a = pq[i * F + f];
        den += a * z[f];
        const float* srow = state.data() + (size_t)f * Dv;
        for (int d = 0; d < Dv; ++d) num[d] += a * srow[d];
      }
      // one normaliser: exact weights are 2^(m) l, far ones exp(far_log) den (natural logs below)
      const float exact_log = st.l[i] > 0.f ? st.m[i] * ln2 : kNegInf;
      const float far_log = den > 0.f ? lq[i] + key_log_scale : kNegInf;
      const float M = std::max(exact_log, far_log);
      float* dst = oh + i * Dv;
      if (M == kNegInf) { std::fill(dst, dst + Dv, 0.f); continue; }
      const float we = exact_log == kNegInf ? 0.f : std::exp(exact_log - M);
      const float wf = far_log == kNegInf ? 0.f : std::exp(far_log - M);
      const float denominator = st.l[i] * we + den * wf + p.eps * std::exp(-M);
      const float inv = denominator > 0.f ? 1.f / denominator : 0.f;
      for (int d = 0; d < Dv; ++d) dst[d] = (st.acc[(size_t)i * Dv + d] * we + num[d] * wf) * inv;
    }
  }
}

}  // namespace longattn
