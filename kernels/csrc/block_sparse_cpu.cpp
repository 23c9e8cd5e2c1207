// Block-sparse flash attention forward for CPUs (fp32), built on demand by kernels/cpu_ext.py.
//
// Why a C++ kernel next to compiled FlexAttention: on AVX2-only CPUs Inductor's flex template uses its own
// micro-GEMM and costs about 2x dense SDPA per computed tile (measured), so 80 % sparsity gave only 2.1-2.5x.
// This kernel runs the same loop as ATen's CPU flash attention (BLAS GEMM per tile + online softmax) but visits
// only the kept key blocks of each query block, so its per-tile cost is that of dense SDPA.
//
// Layout: q [B,H,Lq,D], k/v [B,H,Lk,D] contiguous fp32; counts [B,H,Qb] int32 and indices [B,H,Qb,K] int32
// (kept key blocks per query block, the project's BlockSparseMask). Returns out [B,H,Lq,D] and the natural-log
// LSE [B,H,Lq] (-inf and a zero output for rows that keep no block).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

// Fortran BLAS sgemm (column-major), the routine ATen's CPU GEMM calls. libtorch_cpu exports it (MKL is linked
// statically into the x86 wheels); ATen's own cpublas::gemm wrapper is not exported to extensions.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

using Vec = at::vec::Vectorized<float>;

// Horizontal reductions through a stored copy of the vector. at::vec::vec_reduce_all is not used because its
// overload set differs between the ISA headers (the AVX-512 one takes other argument types than the AVX2 and
// generic ones), and a reduction per row and tile is too rare for its shuffles to matter.
float reduce_max(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float m = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) m = std::max(m, lanes[i]);
  return m;
}

float reduce_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// Row-wise online-softmax update of one tile: s [m, n] scores (scaled) are replaced by exp(s - new_max);
// row_max/row_sum are updated and `acc` [m, d] is rescaled by exp(old_max - new_max).
void softmax_update(float* s, int64_t m, int64_t n, float* row_max, float* row_sum, float* acc, int64_t d) {
  const int64_t vn = n - n % Vec::size();
  for (int64_t r = 0; r < m; ++r) {
    float* row = s + r * n;
    Vec vmax(-std::numeric_limits<float>::infinity());
    int64_t c = 0;
    for (; c < vn; c += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(row + c));
    float mx = reduce_max(vmax);
    for (; c < n; ++c) mx = std::max(mx, row[c]);
    const float new_max = std::max(mx, row_max[r]);
    const Vec vnew(new_max);
    Vec vsum(0.f);
    c = 0;
    for (; c < vn; c += Vec::size()) {
      Vec p = (Vec::loadu(row + c) - vnew).exp_u20();
      p.store(row + c);
      vsum = vsum + p;
    }
    float sum = reduce_sum(vsum);
    for (; c < n; ++c) {
      row[c] = std::exp(row[c] - new_max);
      sum += row[c];
    }
    // row_max starts at -inf: exp(-inf) = 0 zeroes the (empty) accumulator on the first tile
    const float corr = std::exp(row_max[r] - new_max);
    row_sum[r] = row_sum[r] * corr + sum;
    row_max[r] = new_max;
    if (corr != 1.f) {
      float* a = acc + r * d;
      const Vec vc(corr);
      const int64_t vd = d - d % Vec::size();
      int64_t j = 0;
      for (; j < vd; j += Vec::size()) (Vec::loadu(a + j) * vc).store(a + j);
      for (; j < d; ++j) a[j] *= corr;
    }
  }
}

}  // namespace

std::vector<at::Tensor> block_sparse_forward(
    at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor counts, at::Tensor indices,
    int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "block_sparse_forward expects float32 q, k, v");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(counts.scalar_type() == at::kInt && indices.scalar_type() == at::kInt, "counts/indices must be int32");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t bs = block_size;
  const int64_t Qb = (Lq + bs - 1) / bs;
  const int64_t maxk = indices.size(3);
  TORCH_CHECK(counts.sizes() == at::IntArrayRef({B, H, Qb}), "counts must be [B, H, Qb]");
  TORCH_CHECK(indices.size(0) == B && indices.size(1) == H && indices.size(2) == Qb, "indices must be [B, H, Qb, K]");
  auto cnt = counts.contiguous();
  auto idx = indices.contiguous();
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, Lq}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int32_t* cp = cnt.data_ptr<int32_t>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t tasks = B * H * Qb;
  const float sc = static_cast<float>(scale);
  // Dynamic schedule: rows keep different numbers of blocks (adaptive masks), so threads pull tasks from a
  // shared counter instead of taking equal static chunks.
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    std::vector<float> s_buf(bs * bs), acc_buf(bs * D), max_buf(bs), sum_buf(bs);
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      const int64_t bh = t / Qb, qi = t % Qb;
      const int64_t m0 = qi * bs, m = std::min(bs, Lq - m0);
      const float* qt = qp + (bh * Lq + m0) * D;
      float* ot = op + (bh * Lq + m0) * D;
      float* lt = lp + bh * Lq + m0;
      const int32_t n_keep = cp[t];
      const int32_t* kept = ip + t * maxk;
      std::fill(max_buf.begin(), max_buf.begin() + m, -std::numeric_limits<float>::infinity());
      std::fill(sum_buf.begin(), sum_buf.begin() + m, 0.f);
      std::fill(acc_buf.begin(), acc_buf.begin() + m * D, 0.f);
      for (int32_t j = 0; j < n_keep; ++j) {
        const int64_t n0 = static_cast<int64_t>(kept[j]) * bs, n = std::min(bs, Lk - n0);
        const float* kt = kp + (bh * Lk + n0) * D;
        const float* vt = vp + (bh * Lk + n0) * D;
        // column-major BLAS view of row-major buffers: S^T [n, m] = K [n, D] · Q^T  (S row-major [m, n])
        gemm('T', 'N', n, m, D, sc, kt, D, qt, D, 0.f, s_buf.data(), n);
        softmax_update(s_buf.data(), m, n, max_buf.data(), sum_buf.data(), acc_buf.data(), D);
        // acc^T [D, m] += V^T [D, n] · P^T [n, m]  (acc row-major [m, D])
        gemm('N', 'N', D, m, n, 1.f, vt, D, s_buf.data(), n, 1.f, acc_buf.data(), D);
      }
      for (int64_t r = 0; r < m; ++r) {
        if (n_keep == 0) {
          std::fill(ot + r * D, ot + (r + 1) * D, 0.f);
          lt[r] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float inv = 1.f / sum_buf[r];
        for (int64_t j = 0; j < D; ++j) ot[r * D + j] = acc_buf[r * D + j] * inv;
        lt[r] = max_buf[r] + std::log(sum_buf[r]);
      }
    }
  });
  return {out, lse};
}

// Registered as torch.ops.diffusion_accel.block_sparse_cpu_forward (a plain op library: no pybind11 module).
TORCH_LIBRARY(diffusion_accel, m) {
  m.def("block_sparse_cpu_forward(Tensor q, Tensor k, Tensor v, Tensor counts, Tensor indices, int block_size, "
        "float scale) -> Tensor[]",
        &block_sparse_forward);
}
