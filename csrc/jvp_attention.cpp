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

template <typename scalar_t, typename acc_t>
void attention_jvp_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* dq,
                        const scalar_t* dk, const scalar_t* dv, scalar_t* out, scalar_t* dout, int64_t rows,
                        int64_t n_q, int64_t n_k, int64_t d, int64_t dv_dim, acc_t scale) {
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
      scalar_t* orow = out + row * dv_dim;
      scalar_t* dorow = dout + row * dv_dim;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_jvp", &attention_jvp,
        "softmax(scale·QKᵀ)V and its tangent for (dQ, dK, dV), one pass with an online softmax (CPU)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("scale"));
}
