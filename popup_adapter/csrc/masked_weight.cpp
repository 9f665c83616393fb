// Fused CPU kernels for edge-popup's hot path (see popup_adapter/kernels.py).
//
// masked_weight_forward: W * M for M the exact top-`kept` of |S|, in ONE pass over S and W,
// given a guess [low, high] that contains the threshold (the layer's last threshold, widened by
// a band). Every element above the band is kept, every element below it dropped, and the few in
// the band are remembered by index; the threshold is then selected among them alone and only
// they are fixed up. Ties at the threshold go to the lowest flat index, as in
// selection.topk_mask. When the guess misses, nothing is promised about the output and the
// status says on which side the threshold lies.
//
// straight_through_backward: dL/dS = dL/d(W*M) * W * sign(S), one pass.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task: fixed, so results are deterministic
constexpr int64_t kBlock = 64;      // elements counted before looking for band members

enum Status : int64_t { kFound = 0, kAboveBand = 1, kBelowBand = 2 };

template <typename scalar_t>
std::tuple<double, int64_t> forward_impl(const scalar_t* __restrict__ weight,
                                         const scalar_t* __restrict__ scores,
                                         scalar_t* __restrict__ out, int64_t numel, int64_t kept,
                                         double low_d, double high_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t low = static_cast<acc_t>(low_d), high = static_cast<acc_t>(high_d);
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<int64_t> above(chunks, 0);
  std::vector<std::vector<int64_t>> band(chunks);

  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * kChunk, end = std::min(numel, begin + kChunk);
      // Blocks of kBlock: a branch-free loop the compiler vectorizes (the weight is loaded
      // unconditionally: a conditional load keeps the loop scalar, and a random mask then
      // mispredicts every other branch), then, only in the rare block that has band elements,
      // a branch-free compaction of their indices.
      int64_t count = 0;
      for (int64_t block = begin; block < end; block += kBlock) {
        const int64_t block_end = std::min(end, block + kBlock);
        int32_t block_above = 0, block_band = 0;
        for (int64_t i = block; i < block_end; ++i) {
          const acc_t magnitude = std::abs(static_cast<acc_t>(scores[i]));
          const scalar_t w = weight[i];
          const int32_t keep = magnitude > high;
          out[i] = keep ? w : scalar_t(0);
          block_above += keep;
          block_band += (magnitude >= low) & !keep;
        }
        count += block_above;
        if (block_band == 0) continue;
        int64_t found[kBlock + 1];
        int32_t n = 0;
        for (int64_t i = block; i < block_end; ++i) {
          const acc_t magnitude = std::abs(static_cast<acc_t>(scores[i]));
          found[n] = i;
          n += (magnitude >= low) & (magnitude <= high);
        }
        band[c].insert(band[c].end(), found, found + n);
      }
      above[c] = count;
    }
  });

  int64_t total_above = 0, total_band = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    total_above += above[c];
    total_band += static_cast<int64_t>(band[c].size());
  }
  if (total_above >= kept) return {high_d, kAboveBand};
  if (total_above + total_band < kept) return {low_d, kBelowBand};

  // indices in increasing order (chunks in order, each chunk in order)
  std::vector<int64_t> indices;
  indices.reserve(total_band);
  for (auto& part : band) indices.insert(indices.end(), part.begin(), part.end());
  std::vector<acc_t> magnitudes(indices.size());
  for (size_t j = 0; j < indices.size(); ++j)
    magnitudes[j] = std::abs(static_cast<acc_t>(scores[indices[j]]));

  const int64_t needed = kept - total_above;  // from the band, >= 1
  std::vector<acc_t> order(magnitudes);
  std::nth_element(order.begin(), order.begin() + (needed - 1), order.end(), std::greater<acc_t>());
  const acc_t threshold = order[needed - 1];

  int64_t strictly_above = 0;
  for (acc_t m : magnitudes) strictly_above += m > threshold;
  int64_t ties_left = needed - strictly_above;
  for (size_t j = 0; j < indices.size(); ++j) {
    const acc_t m = magnitudes[j];
    const bool keep = m > threshold || (m == threshold && ties_left-- > 0);
    if (keep) out[indices[j]] = weight[indices[j]];
  }
  return {static_cast<double>(threshold), kFound};
}

std::tuple<at::Tensor, double, int64_t> masked_weight_forward(const at::Tensor& weight,
                                                              const at::Tensor& scores,
                                                              int64_t kept, double low,
                                                              double high) {
  TORCH_CHECK(weight.device().is_cpu() && scores.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(weight.is_contiguous() && scores.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(weight.scalar_type() == scores.scalar_type(), "weight and scores dtypes differ");
  TORCH_CHECK(weight.numel() == scores.numel(), "weight and scores sizes differ");
  TORCH_CHECK(kept >= 1 && kept <= weight.numel(), "kept out of range");
  TORCH_CHECK(low <= high, "low > high");
  at::Tensor out = at::empty_like(weight);
  double threshold = 0;
  int64_t status = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, weight.scalar_type(), "masked_weight_forward", [&] {
        std::tie(threshold, status) =
            forward_impl<scalar_t>(weight.const_data_ptr<scalar_t>(),
                                   scores.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>(), weight.numel(), kept, low,
                                   high);
      });
  return {out, threshold, status};
}

// out = grad * W * sign(S); `out` may be `grad` itself (each element is read, then written)
void straight_through_backward_into(const at::Tensor& grad, const at::Tensor& weight,
                                    const at::Tensor& scores, const at::Tensor& out) {
  TORCH_CHECK(grad.is_contiguous() && weight.is_contiguous() && scores.is_contiguous() &&
                  out.is_contiguous(),
              "contiguous tensors expected");
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type() &&
                  weight.scalar_type() == scores.scalar_type() &&
                  scores.scalar_type() == out.scalar_type(),
              "grad, weight and scores dtypes differ");
  TORCH_CHECK(grad.numel() == weight.numel() && weight.numel() == scores.numel() &&
                  scores.numel() == out.numel(),
              "grad, weight and scores sizes differ");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, scores.scalar_type(), "straight_through_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* g = grad.const_data_ptr<scalar_t>();
        const scalar_t* __restrict__ w = weight.const_data_ptr<scalar_t>();
        const scalar_t* __restrict__ s = scores.const_data_ptr<scalar_t>();
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, scores.numel(), kChunk, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            // W * sign(S) as selects over unconditional values, so the loop vectorizes
            const acc_t si = static_cast<acc_t>(s[i]), wi = static_cast<acc_t>(w[i]);
            const acc_t signed_w = si == acc_t(0) ? acc_t(0) : (si > acc_t(0) ? wi : -wi);
            o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * signed_w);
          }
        });
      });
}

at::Tensor straight_through_backward(const at::Tensor& grad, const at::Tensor& weight,
                                     const at::Tensor& scores) {
  at::Tensor out = at::empty_like(scores);
  straight_through_backward_into(grad, weight, scores, out);
  return out;
}

// In place in `grad`: no new buffer (a fresh one per layer and step costs page faults).
at::Tensor& straight_through_backward_(at::Tensor& grad, const at::Tensor& weight,
                                       const at::Tensor& scores) {
  straight_through_backward_into(grad, weight, scores, grad);
  return grad;
}

}  // namespace

TORCH_LIBRARY(popup_adapter, m) {
  m.def("masked_weight_forward(Tensor weight, Tensor scores, int kept, float low, float high)"
        " -> (Tensor, float, int)");
  m.def("straight_through_backward(Tensor grad, Tensor weight, Tensor scores) -> Tensor");
  m.def("straight_through_backward_(Tensor(a!) grad, Tensor weight, Tensor scores) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(popup_adapter, CPU, m) {
  m.impl("masked_weight_forward", &masked_weight_forward);
  m.impl("straight_through_backward", &straight_through_backward);
  m.impl("straight_through_backward_", &straight_through_backward_);
}
