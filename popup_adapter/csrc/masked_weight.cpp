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
//
// The *_signs variants read a signed-constant base held as sign bits (popup_adapter/sign_bits.py:
// flat uint8, little bit order, a set bit a negative weight) and one magnitude, and expand
// +-scale in the same pass: the float weights are never written.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task: fixed, so results are deterministic
constexpr int64_t kBlock = 64;      // elements counted before looking for band members

enum Status : int64_t { kFound = 0, kAboveBand = 1, kBelowBand = 2 };

// The W * M the forward kernels write: every layer's forward, and its backward again, writes
// one, used by one matmul and freed. Left to malloc, these blocks alternate with the
// activations allocated between them, and glibc's heap (where blocks under its adaptive mmap
// threshold go) keeps the holes they leave: a training step's peak RSS rose by up to a model's
// worth of weights above its live tensors (ViT-S: 1.08x dense instead of 0.94x). A freed block
// is kept here instead and the next W * M that fits takes it, so one block, the largest layer's
// after the first step, serves layer after layer (one W * M is alive at a time, unless threads
// run forwards at once: the others then come from malloc). A block returns only when its last
// tensor is freed (the storage's deleter), so nothing can see it reused. At most kBlocks
// blocks and kCachedBytes are kept (the smallest go back to malloc first).
class BlockCache {
 public:
  static constexpr size_t kBlocks = 1;
  static constexpr size_t kMostWaste = 4;  // a block serves a W * M of a quarter its size or more
  static constexpr size_t kCachedBytes = size_t{256} << 20;

  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: deleters run until exit
    return *cache;
  }

  // a block of at least `nbytes`, and its size
  std::pair<void*, size_t> take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto fits = free_.lower_bound(nbytes);
      if (fits != free_.end() && fits->first / kMostWaste <= nbytes) {
        const std::pair<void*, size_t> block{fits->second, fits->first};
        cached_ -= fits->first;
        free_.erase(fits);
        return block;
      }
    }
    return {c10::alloc_cpu(nbytes), nbytes};
  }

  void give_back(void* block, size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.emplace(nbytes, block);
      cached_ += nbytes;
    }
    keep_at_most(kBlocks, kCachedBytes);
  }

  // returns cached blocks to malloc, the smallest first, until at most `blocks` of them and
  // `bytes` are kept
  void keep_at_most(size_t blocks, size_t bytes) {
    std::vector<std::pair<size_t, void*>> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (free_.size() > blocks || cached_ > bytes) {
        released.emplace_back(*free_.begin());
        cached_ -= free_.begin()->first;
        free_.erase(free_.begin());
      }
    }
    for (const auto& [size, data] : released) c10::free_cpu(data);
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

// A contiguous tensor shaped and typed as `like`, its memory from the BlockCache
at::Tensor cached_empty_like(const at::Tensor& like) {
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (nbytes == 0) return at::empty_like(like, at::MemoryFormat::Contiguous);
  const auto [block, size] = BlockCache::instance().take(nbytes);
  return at::from_blob(
      block, like.sizes(), [size](void* data) { BlockCache::instance().give_back(data, size); },
      like.options());
}

// The weights, read as W[i] (`operator()`, for the few band fix-ups) or a block of up to kBlock
// at a time from a kBlock-aligned start (`block`: a pointer to them, written into `scratch` if
// they are not stored as floats), so that the hot loops stay branch-free and vectorized.
template <typename scalar_t>
struct DenseWeight {
  const scalar_t* __restrict__ values;
  scalar_t operator()(int64_t i) const { return values[i]; }
  const scalar_t* block(int64_t begin, int64_t, scalar_t*) const { return values + begin; }
};

// W[i] = -scale where bit i is set, else +scale; a block is expanded a byte at a time from
// `table` (the 8 weights of each of the 256 bytes, see SignTable)
template <typename scalar_t>
struct SignBits {
  const uint8_t* __restrict__ bits;
  const scalar_t* __restrict__ table;
  scalar_t operator()(int64_t i) const { return table[(bits[i >> 3] >> (i & 7)) & 1 ? 8 * 255 : 0]; }
  const scalar_t* block(int64_t begin, int64_t n, scalar_t* __restrict__ scratch) const {
    const uint8_t* __restrict__ first = bits + (begin >> 3);
    for (int64_t b = 0; b < (n + 7) / 8; ++b)
      std::memcpy(scratch + 8 * b, table + 8 * first[b], 8 * sizeof(scalar_t));
    return scratch;
  }
};

// The 8 weights each byte of sign bits stands for, for one scale
template <typename scalar_t>
std::vector<scalar_t> sign_table(double scale) {
  std::vector<scalar_t> table(256 * 8);
  for (int byte = 0; byte < 256; ++byte)
    for (int j = 0; j < 8; ++j)
      table[8 * byte + j] = static_cast<scalar_t>((byte >> j) & 1 ? -scale : scale);
  return table;
}

template <typename scalar_t, typename Weight>
std::tuple<double, int64_t> forward_impl(const Weight weight,
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
        scalar_t scratch[kBlock];
        const scalar_t* __restrict__ block_weight = weight.block(block, block_end - block, scratch);
        for (int64_t i = block; i < block_end; ++i) {
          const acc_t magnitude = std::abs(static_cast<acc_t>(scores[i]));
          const scalar_t w = block_weight[i - block];
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
    if (keep) out[indices[j]] = weight(indices[j]);
  }
  return {static_cast<double>(threshold), kFound};
}

void check_selection(const at::Tensor& scores, int64_t kept, double low, double high) {
  TORCH_CHECK(scores.device().is_cpu() && scores.is_contiguous(), "contiguous CPU scores expected");
  TORCH_CHECK(kept >= 1 && kept <= scores.numel(), "kept out of range");
  TORCH_CHECK(low <= high, "low > high");
}

void check_signs(const at::Tensor& bits, const at::Tensor& scores) {
  TORCH_CHECK(bits.device().is_cpu() && bits.is_contiguous(), "contiguous CPU sign bits expected");
  TORCH_CHECK(bits.scalar_type() == at::kByte, "sign bits must be uint8");
  TORCH_CHECK(bits.numel() == (scores.numel() + 7) / 8, "sign bits and scores sizes differ");
}

std::tuple<at::Tensor, double, int64_t> masked_weight_forward(const at::Tensor& weight,
                                                              const at::Tensor& scores,
                                                              int64_t kept, double low,
                                                              double high) {
  check_selection(scores, kept, low, high);
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous(), "contiguous CPU weight expected");
  TORCH_CHECK(weight.scalar_type() == scores.scalar_type(), "weight and scores dtypes differ");
  TORCH_CHECK(weight.numel() == scores.numel(), "weight and scores sizes differ");
  at::Tensor out = cached_empty_like(weight);
  double threshold = 0;
  int64_t status = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, weight.scalar_type(), "masked_weight_forward", [&] {
        std::tie(threshold, status) = forward_impl<scalar_t>(
            DenseWeight<scalar_t>{weight.const_data_ptr<scalar_t>()},
            scores.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), weight.numel(),
            kept, low, high);
      });
  return {out, threshold, status};
}

std::tuple<at::Tensor, double, int64_t> masked_weight_forward_signs(const at::Tensor& bits,
                                                                    double scale,
                                                                    const at::Tensor& scores,
                                                                    int64_t kept, double low,
                                                                    double high) {
  check_selection(scores, kept, low, high);
  check_signs(bits, scores);
  at::Tensor out = cached_empty_like(scores);
  double threshold = 0;
  int64_t status = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, scores.scalar_type(), "masked_weight_forward_signs", [&] {
        const std::vector<scalar_t> table = sign_table<scalar_t>(scale);
        std::tie(threshold, status) = forward_impl<scalar_t>(
            SignBits<scalar_t>{bits.const_data_ptr<uint8_t>(), table.data()},
            scores.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), scores.numel(), kept, low, high);
      });
  return {out, threshold, status};
}

// o = g * W * sign(S); `o` may be `g` itself (each element is read, then written)
template <typename scalar_t, typename Weight>
void backward_impl(const scalar_t* g, const Weight weight, const scalar_t* __restrict__ s,
                   scalar_t* o, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first * kChunk; block < std::min(numel, last * kChunk); block += kBlock) {
      const int64_t block_end = std::min(numel, block + kBlock);
      scalar_t scratch[kBlock];
      const scalar_t* __restrict__ w = weight.block(block, block_end - block, scratch);
      for (int64_t i = block; i < block_end; ++i) {
        // W * sign(S) as selects over unconditional values, so the loop vectorizes
        const acc_t si = static_cast<acc_t>(s[i]), wi = static_cast<acc_t>(w[i - block]);
        const acc_t signed_w = si == acc_t(0) ? acc_t(0) : (si > acc_t(0) ? wi : -wi);
        o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * signed_w);
      }
    }
  });
}

void check_backward(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& out) {
  TORCH_CHECK(grad.is_contiguous() && scores.is_contiguous() && out.is_contiguous(),
              "contiguous tensors expected");
  TORCH_CHECK(grad.scalar_type() == scores.scalar_type() &&
                  scores.scalar_type() == out.scalar_type(),
              "grad and scores dtypes differ");
  TORCH_CHECK(grad.numel() == scores.numel() && scores.numel() == out.numel(),
              "grad and scores sizes differ");
}

void straight_through_backward_into(const at::Tensor& grad, const at::Tensor& weight,
                                    const at::Tensor& scores, const at::Tensor& out) {
  check_backward(grad, scores, out);
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == scores.scalar_type() &&
                  weight.numel() == scores.numel(),
              "the weight must be contiguous, of the scores' dtype and size");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, scores.scalar_type(), "straight_through_backward", [&] {
        backward_impl<scalar_t>(grad.const_data_ptr<scalar_t>(),
                                DenseWeight<scalar_t>{weight.const_data_ptr<scalar_t>()},
                                scores.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(), scores.numel());
      });
}

void straight_through_backward_signs_into(const at::Tensor& grad, const at::Tensor& bits,
                                          double scale, const at::Tensor& scores,
                                          const at::Tensor& out) {
  check_backward(grad, scores, out);
  check_signs(bits, scores);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, scores.scalar_type(), "straight_through_backward_signs", [&] {
        const std::vector<scalar_t> table = sign_table<scalar_t>(scale);
        backward_impl<scalar_t>(grad.const_data_ptr<scalar_t>(),
                                SignBits<scalar_t>{bits.const_data_ptr<uint8_t>(), table.data()},
                                scores.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(), scores.numel());
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

at::Tensor straight_through_backward_signs(const at::Tensor& grad, const at::Tensor& bits,
                                           double scale, const at::Tensor& scores) {
  at::Tensor out = at::empty_like(scores);
  straight_through_backward_signs_into(grad, bits, scale, scores, out);
  return out;
}

at::Tensor& straight_through_backward_signs_(at::Tensor& grad, const at::Tensor& bits,
                                             double scale, const at::Tensor& scores) {
  straight_through_backward_signs_into(grad, bits, scale, scores, grad);
  return grad;
}

// torch.cuda.empty_cache's counterpart: the cached W * M block goes back to malloc (a training
// loop that is done, before inference or the next model)
void empty_cache() { BlockCache::instance().keep_at_most(0, 0); }

}  // namespace

TORCH_LIBRARY(popup_adapter, m) {
  m.def("empty_cache() -> ()", &empty_cache);
  m.def("masked_weight_forward(Tensor weight, Tensor scores, int kept, float low, float high)"
        " -> (Tensor, float, int)");
  m.def("straight_through_backward(Tensor grad, Tensor weight, Tensor scores) -> Tensor");
  m.def("straight_through_backward_(Tensor(a!) grad, Tensor weight, Tensor scores) -> Tensor(a!)");
  m.def("masked_weight_forward_signs(Tensor bits, float scale, Tensor scores, int kept, float low,"
        " float high) -> (Tensor, float, int)");
  m.def("straight_through_backward_signs(Tensor grad, Tensor bits, float scale, Tensor scores)"
        " -> Tensor");
  m.def("straight_through_backward_signs_(Tensor(a!) grad, Tensor bits, float scale,"
        " Tensor scores) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(popup_adapter, CPU, m) {
  m.impl("masked_weight_forward", &masked_weight_forward);
  m.impl("straight_through_backward", &straight_through_backward);
  m.impl("straight_through_backward_", &straight_through_backward_);
  m.impl("masked_weight_forward_signs", &masked_weight_forward_signs);
  m.impl("straight_through_backward_signs", &straight_through_backward_signs);
  m.impl("straight_through_backward_signs_", &straight_through_backward_signs_);
}
