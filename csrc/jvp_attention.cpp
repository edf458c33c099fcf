// Attention and its forward-mode tangent in one pass with an online softmax (spec/mf.md §2.3), CPU.
//
// For each (batch, head, query row i) the keys are streamed once, keeping the running max m, the unnormalised
// mass l = Σ exp(S_ij − m) and four accumulators
//     A = Σ e_ij V_j,  B = Σ e_ij Ṡ_ij V_j,  C = Σ e_ij V̇_j,  M = Σ e_ij Ṡ_ij      (e_ij = exp(S_ij − m))
// rescaled by exp(m − m') whenever the max grows. At the end O = A/l and Ȯ = (B + C)/l − (M/l)·O. No N×N matrix
// is formed; the cost is ≈ 3× the primal's FLOPs. Rows are distributed over threads with at::parallel_for.
// Accumulation is in double for double inputs and in float otherwise (bf16/fp16 inputs are widened on load).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

// Where output row `row` (= (b·H + h)·n_q + i) goes: [B, H, n_q, dv] contiguous by default; the attention block
// writes [B, n_q, H·dv] directly (the layout the projection reads), saving a transpose copy.
struct OutLayout {
  int64_t heads = 1, n_q = 1, batch_stride = 0, head_stride = 0, row_stride = 0;
  bool merged = false;
  int64_t offset(int64_t row, int64_t dv_dim) const {
    if (!merged) return row * dv_dim;
    const int64_t bh = row / n_q, i = row % n_q;
    return (bh / heads) * batch_stride + (bh % heads) * head_stride + i * row_stride;
  }
};

template <typename scalar_t, typename acc_t>
void attention_jvp_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* dq,
                        const scalar_t* dk, const scalar_t* dv, scalar_t* out, scalar_t* dout, int64_t rows,
                        int64_t n_q, int64_t n_k, int64_t d, int64_t dv_dim, acc_t scale,
                        const OutLayout& layout = OutLayout()) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> A(dv_dim), B(dv_dim), C(dv_dim), qi(d), dqi(d);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / n_q;
      const scalar_t* qrow = q + row * d;
      const scalar_t* dqrow = dq + row * d;
      const scalar_t* kb = k + bh * n_k * d;
      const scalar_t* dkb = dk + bh * n_k * d;
      const scalar_t* vb = v + bh * n_k * dv_dim;
      const scalar_t* dvb = dv + bh * n_k * dv_dim;
      for (int64_t c = 0; c < d; ++c) {
        qi[c] = static_cast<acc_t>(qrow[c]);
        dqi[c] = static_cast<acc_t>(dqrow[c]);
      }
      std::fill(A.begin(), A.end(), acc_t(0));
      std::fill(B.begin(), B.end(), acc_t(0));
      std::fill(C.begin(), C.end(), acc_t(0));
      acc_t m = -std::numeric_limits<acc_t>::infinity(), l = 0, M = 0;
      for (int64_t j = 0; j < n_k; ++j) {
        const scalar_t* kj = kb + j * d;
        const scalar_t* dkj = dkb + j * d;
        acc_t s = 0, ds = 0;
        for (int64_t c = 0; c < d; ++c) {
          const acc_t kc = static_cast<acc_t>(kj[c]);
          s += qi[c] * kc;
          ds += dqi[c] * kc + qi[c] * static_cast<acc_t>(dkj[c]);
        }
        s *= scale;
        ds *= scale;
        if (s > m) {  // rescale what was accumulated under the old max
          const acc_t r = std::exp(m - s);
          l *= r;
          M *= r;
          for (int64_t c = 0; c < dv_dim; ++c) {
            A[c] *= r;
            B[c] *= r;
            C[c] *= r;
          }
          m = s;
        }
        const acc_t e = std::exp(s - m);
        l += e;
        M += e * ds;
        const scalar_t* vj = vb + j * dv_dim;
        const scalar_t* dvj = dvb + j * dv_dim;
        for (int64_t c = 0; c < dv_dim; ++c) {
          const acc_t vc = static_cast<acc_t>(vj[c]);
          A[c] += e * vc;
          B[c] += e * ds * vc;
          C[c] += e * static_cast<acc_t>(dvj[c]);
        }
      }
      const acc_t inv = acc_t(1) / l, mu = M * inv;
      scalar_t* orow = out + layout.offset(row, dv_dim);
      scalar_t* dorow = dout + layout.offset(row, dv_dim);
      for (int64_t c = 0; c < dv_dim; ++c) {
        const acc_t o = A[c] * inv;
        orow[c] = static_cast<scalar_t>(o);
        dorow[c] = static_cast<scalar_t>((B[c] + C[c]) * inv - mu * o);
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "attention_jvp: ", name, " must be a CPU tensor (CUDA tensors take the Triton "
              "or reference path)");
  TORCH_CHECK(t.dim() == 4, "attention_jvp: ", name, " must be [batch, heads, seq, head_dim], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "attention_jvp: ", name, " is ", t.scalar_type(),
              " but q is ", like.scalar_type());
}

}  // namespace

std::vector<torch::Tensor> attention_jvp(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor dq,
                                         torch::Tensor dk, torch::Tensor dv, double scale) {
  check(q, "q", q);
  check(k, "k", q);
  check(v, "v", q);
  check(dq, "dq", q);
  check(dk, "dk", q);
  check(dv, "dv", q);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "attention_jvp: k ", k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "attention_jvp: v ", v.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes(),
              "attention_jvp: each tangent must have its primal's shape");
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto dqc = dq.contiguous(), dkc = dk.contiguous(), dvc = dv.contiguous();
  const int64_t n_q = q.size(2), n_k = k.size(2), d = q.size(3), dv_dim = v.size(3);
  const int64_t rows = q.size(0) * q.size(1) * n_q;
  auto out = torch::empty({q.size(0), q.size(1), n_q, dv_dim}, q.options());
  auto dout = torch::empty_like(out);
  if (rows == 0) return {out, dout};
  TORCH_CHECK(n_k > 0, "attention_jvp: no keys");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_jvp", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attention_jvp_rows<scalar_t, acc_t>(qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                                        dqc.data_ptr<scalar_t>(), dkc.data_ptr<scalar_t>(), dvc.data_ptr<scalar_t>(),
                                        out.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(), rows, n_q, n_k, d,
                                        dv_dim, static_cast<acc_t>(scale));
  });
  return {out, dout};
}

// The attention block of a DiT on both streams: [x; ẋ]·W_qkvᵀ as one GEMM (bias on the primal half), the one-pass
// (O, Ȯ) kernel writing straight into the stacked [2B, N, C] input of the projection, and [O; Ȯ]·W_projᵀ as one
// GEMM. engine/networks/dit_jvp.py `attention_block` is the same computation in PyTorch (its reference).
std::vector<torch::Tensor> attention_block_jvp(torch::Tensor x, torch::Tensor dx, torch::Tensor qkv_w,
                                               torch::Tensor qkv_b, torch::Tensor proj_w, torch::Tensor proj_b,
                                               int64_t heads, double scale) {
  TORCH_CHECK(x.dim() == 3 && dx.sizes() == x.sizes(), "attention_block_jvp: x and dx must be [batch, seq, dim] "
              "of one shape, got ", x.sizes(), " and ", dx.sizes());
  TORCH_CHECK(x.device().is_cpu(), "attention_block_jvp: CPU tensors only");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(heads > 0 && C % heads == 0, "attention_block_jvp: dim ", C, " is not divisible by ", heads,
              " heads");
  TORCH_CHECK(qkv_w.dim() == 2 && qkv_w.size(0) == 3 * C && qkv_w.size(1) == C && proj_w.dim() == 2 &&
              proj_w.size(0) == C && proj_w.size(1) == C, "attention_block_jvp: weights must be qkv [3C, C] and "
              "proj [C, C] for C = ", C);
  const int64_t d = C / heads;
  auto y = at::matmul(at::cat({x, dx}), qkv_w.t());                      // [2B, N, 3C]
  auto split = [&](const torch::Tensor& t) {
    return t.reshape({B, N, 3, heads, d}).permute({2, 0, 3, 1, 4}).contiguous();  // [3, B, H, N, d]
  };
  auto qkv = split(y.narrow(0, 0, B) + qkv_b), dqkv = split(y.narrow(0, B, B));
  auto stacked = torch::empty({2 * B, N, C}, x.options());               // [O; Ȯ] in the projection's layout
  if (B * N > 0) {
    OutLayout layout;
    layout.merged = true;
    layout.heads = heads;
    layout.n_q = N;
    layout.batch_stride = N * C;
    layout.head_stride = d;
    layout.row_stride = C;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "attention_block_jvp", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      scalar_t* base = stacked.data_ptr<scalar_t>();
      const int64_t plane = B * heads * N * d;
      const scalar_t* p = qkv.data_ptr<scalar_t>();
      const scalar_t* dp = dqkv.data_ptr<scalar_t>();
      attention_jvp_rows<scalar_t, acc_t>(p, p + plane, p + 2 * plane, dp, dp + plane, dp + 2 * plane, base,
                                          base + B * N * C, B * heads * N, N, N, d, d,
                                          static_cast<acc_t>(scale), layout);
    });
  }
  auto z = at::matmul(stacked, proj_w.t());
  return {z.narrow(0, 0, B) + proj_b, z.narrow(0, B, B)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_jvp", &attention_jvp,
        "softmax(scale·QKᵀ)V and its tangent for (dQ, dK, dV), one pass with an online softmax (CPU)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("scale"));
  m.def("attention_block_jvp", &attention_block_jvp,
        "a DiT attention block (qkv, attention, proj) on the primal and tangent streams, each linear layer one "
        "GEMM over both (CPU)", py::arg("x"), py::arg("dx"), py::arg("qkv_w"), py::arg("qkv_b"), py::arg("proj_w"),
        py::arg("proj_b"), py::arg("heads"), py::arg("scale"));
}
