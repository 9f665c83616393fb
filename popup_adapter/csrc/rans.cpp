// Masks decoded at memory speed (see popup_adapter/codec.py, whose reference is constriction).
//
// rans_decode_bernoulli_: the bits of a constriction AnsCoder stream (32-bit words, 64-bit
// state, read from the end; 24-bit precision) under Bernoulli models built as constriction's
// Bernoulli(p, perfect=False) builds them: from_floating_point_probabilities_fast([1 - p, p])
// gives symbol 1 the left cumulative trunc((1 - p) * ((2^24 - 2) / ((1 - p) + p))) + 1, in
// float64, written one byte per symbol into out. Each symbol's p is table[index[i]] (or
// table[0] for all). The same stream, the same bits: tests compare it with constriction on
// random masks. It releases the GIL, so the layers of a model decode on several threads, each
// into the memory its caller allocated.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kPrecision = 24;
constexpr uint64_t kQuantileMask = (uint64_t{1} << kPrecision) - 1;
constexpr uint64_t kRefill = uint64_t{1} << 32;  // the state's lower bound while words remain

// symbol 1's left cumulative frequency (symbol 0 has [0, cdf), symbol 1 [cdf, 2^24))
inline uint32_t bernoulli_split(double p) {
  const double q = 1.0 - p;
  const double scale = static_cast<double>((uint32_t{1} << kPrecision) - 2) / (0.0 + q + p);
  const double left = q * scale;
  // Rust's `as u32`: truncation toward zero, saturating (the value is within range here)
  const uint32_t truncated = left <= 0.0 ? 0u : static_cast<uint32_t>(left);
  return truncated + 1u;
}

at::Tensor& rans_decode_bernoulli_(at::Tensor& out, const at::Tensor& words,
                                   const at::Tensor& table, const at::Tensor& index) {
  TORCH_CHECK(out.scalar_type() == at::kByte && out.is_contiguous() && out.device().is_cpu(),
              "out: a contiguous uint8 CPU tensor, one byte per symbol");
  const int64_t numel = out.numel();
  TORCH_CHECK(words.dim() == 1 && words.scalar_type() == at::kInt && words.is_contiguous(),
              "words: a contiguous int32 vector (the uint32 words' bits)");
  TORCH_CHECK(table.dim() == 1 && table.scalar_type() == at::kDouble && table.numel() >= 1,
              "table: a float64 vector of probabilities");
  const bool per_symbol = index.numel() > 0;
  TORCH_CHECK(!per_symbol || (index.scalar_type() == at::kByte && index.numel() == numel &&
                              index.is_contiguous()),
              "index: empty, or a uint8 vector of one table entry per symbol");
  const double* probabilities = table.const_data_ptr<double>();
  std::vector<uint32_t> splits(table.numel());
  for (int64_t t = 0; t < table.numel(); ++t) {
    TORCH_CHECK(probabilities[t] >= 0.0 && probabilities[t] <= 1.0, "p must be in [0, 1]");
    splits[t] = bernoulli_split(probabilities[t]);
  }
  const uint8_t* symbol_index = per_symbol ? index.const_data_ptr<uint8_t>() : nullptr;
  if (per_symbol) {
    for (int64_t i = 0; i < numel; ++i)
      TORCH_CHECK(symbol_index[i] < table.numel(), "index out of range");
  }

  const uint32_t* w = reinterpret_cast<const uint32_t*>(words.const_data_ptr<int32_t>());
  int64_t remaining = words.numel();
  // constriction's from_compressed: no trailing zero word; the state is read from the end
  TORCH_CHECK(remaining == 0 || w[remaining - 1] != 0, "the stream ends in a zero word");
  uint64_t state = 0;
  if (remaining > 0) {
    state = w[--remaining];
    while (remaining > 0 && state < kRefill) state = (state << 32) | w[--remaining];
  }

  uint8_t* bits = out.mutable_data_ptr<uint8_t>();
  const uint32_t split = splits[0];
  for (int64_t i = 0; i < numel; ++i) {
    const uint32_t cdf = per_symbol ? splits[symbol_index[i]] : split;
    const uint32_t quantile = static_cast<uint32_t>(state & kQuantileMask);
    const bool one = quantile >= cdf;
    const uint64_t probability = one ? (uint64_t{1} << kPrecision) - cdf : cdf;
    const uint64_t left = one ? cdf : 0;
    state = (state >> kPrecision) * probability + (quantile - left);
    if (state < kRefill && remaining > 0) state = (state << 32) | w[--remaining];
    bits[i] = one;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(popup_adapter, m) {
  m.def(
      "rans_decode_bernoulli_(Tensor(a!) out, Tensor words, Tensor table, Tensor index) -> "
      "Tensor(a!)");
}

TORCH_LIBRARY_IMPL(popup_adapter, CPU, m) {
  m.impl("rans_decode_bernoulli_", &rans_decode_bernoulli_);
}
