// Masks decoded at memory speed (see popup_adapter/codec.py, whose reference is constriction).
//
// rans_decode_bernoulli_: the bits of constriction AnsCoder streams (32-bit words, 64-bit
// state, read from the end; 24-bit precision) under Bernoulli models built as constriction's
// Bernoulli(p, perfect=False) builds them: from_floating_point_probabilities_fast([1 - p, p])
// gives symbol 1 the left cumulative trunc((1 - p) * ((2^24 - 2) / ((1 - p) + p))) + 1, in
// float64, written one byte per symbol into out. Each symbol's p is table[index[i]] (or
// table[0] for all). The same stream, the same bits: tests compare it with constriction on
// random masks. It releases the GIL, so the layers of a model decode on several threads, each
// into the memory its caller allocated.
//
// One stream's symbols form a dependency chain (each state is the last one times a
// probability), about 3.5 ns a symbol on one core whatever the hardware could overlap. So the
// op takes many streams (a model's layers) and decodes kLanes of them interleaved, one symbol
// of each per step: independent chains the core runs side by side (2.6x faster for 4 lanes).

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
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

// more lanes spill the states out of registers (8 were slower than 4)
constexpr int kLanes = 4;

// one stream being decoded: its coder state, the words not yet read, the symbols still to write
struct Lane {
  uint64_t state;
  const uint32_t* words;
  int64_t remaining;
  uint8_t* bits;
  int64_t left;
  const uint32_t* splits;  // the cumulative of symbol 1 for each table entry
  const uint8_t* index;    // each symbol's table entry (PerSymbol lanes only)
};

// m symbols of each of the K lanes, interleaved; PerSymbol: each symbol's own table entry
template <int K, bool PerSymbol>
void decode_steps(Lane* lanes, int64_t m) {
  // locals, not the lanes' fields: a byte written through `bits` may alias any memory that
  // escaped, which would make the compiler reload every field after each symbol
  uint64_t state[K];
  int64_t remaining[K];
  const uint32_t* words[K];
  uint8_t* bits[K];
  const uint32_t* splits[K];
  const uint8_t* index[K];
  for (int k = 0; k < K; ++k) {
    state[k] = lanes[k].state;
    remaining[k] = lanes[k].remaining;
    words[k] = lanes[k].words;
    bits[k] = lanes[k].bits;
    splits[k] = lanes[k].splits;
    index[k] = lanes[k].index;
  }
  uint32_t split[K];
  for (int k = 0; k < K; ++k) split[k] = splits[k][0];
  for (int64_t i = 0; i < m; ++i) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const uint32_t cdf = PerSymbol ? splits[k][index[k][i]] : split[k];
      const uint32_t quantile = static_cast<uint32_t>(state[k] & kQuantileMask);
      const bool one = quantile >= cdf;
      // the symbol's frequency and left cumulative selected by a mask, not a branch: the
      // compiler branched on the symbol itself (unpredictable) once the lanes fill registers
      const uint64_t select = uint64_t{0} - static_cast<uint64_t>(one);
      const uint64_t probability = cdf ^ (select & (cdf ^ ((uint64_t{1} << kPrecision) - cdf)));
      const uint64_t left = select & cdf;
      uint64_t next = (state[k] >> kPrecision) * probability + (quantile - left);
      if (next < kRefill && remaining[k] > 0) next = (next << 32) | words[k][--remaining[k]];
      state[k] = next;
      bits[k][i] = one;
    }
  }
  for (int k = 0; k < K; ++k) {
    lanes[k].state = state[k];
    lanes[k].remaining = remaining[k];
    lanes[k].bits += m;
    lanes[k].left -= m;
    if (PerSymbol) lanes[k].index += m;
  }
}

template <bool PerSymbol>
void decode_steps(Lane* lanes, int active, int64_t m) {
  switch (active) {
    case 4: return decode_steps<4, PerSymbol>(lanes, m);
    case 3: return decode_steps<3, PerSymbol>(lanes, m);
    case 2: return decode_steps<2, PerSymbol>(lanes, m);
    default: return decode_steps<1, PerSymbol>(lanes, m);
  }
}
static_assert(kLanes == 4, "decode_steps dispatches on up to 4 active lanes");

// every stream of `streams` (ready lanes), kLanes at a time: a finished lane takes the next
// stream, the longest first, so that the last steps, with fewer lanes, are short
template <bool PerSymbol>
void decode_streams(std::vector<Lane> streams) {
  std::sort(streams.begin(), streams.end(),
            [](const Lane& a, const Lane& b) { return a.left > b.left; });
  Lane lanes[kLanes];
  int active = 0;
  size_t next = 0;
  for (;;) {
    while (active < kLanes && next < streams.size()) lanes[active++] = streams[next++];
    if (active == 0) return;
    int64_t m = lanes[0].left;
    for (int k = 1; k < active; ++k) m = std::min(m, lanes[k].left);
    decode_steps<PerSymbol>(lanes, active, m);
    int unfinished = 0;
    for (int k = 0; k < active; ++k)
      if (lanes[k].left > 0) lanes[unfinished++] = lanes[k];
    active = unfinished;
  }
}

void rans_decode_bernoulli_(at::TensorList out, at::TensorList words, at::TensorList table,
                            at::TensorList index) {
  const size_t count = out.size();
  TORCH_CHECK(words.size() == count && table.size() == count && index.size() == count,
              "out, words, table and index: one entry per stream each");
  // the split tables outlive the lanes that point into them
  std::vector<std::vector<uint32_t>> splits(count);
  std::vector<Lane> shared_lanes, per_symbol_lanes;
  for (size_t s = 0; s < count; ++s) {
    const at::Tensor& bits = out[s];
    TORCH_CHECK(bits.scalar_type() == at::kByte && bits.is_contiguous() && bits.device().is_cpu(),
                "out: contiguous uint8 CPU tensors, one byte per symbol");
    const int64_t numel = bits.numel();
    TORCH_CHECK(words[s].dim() == 1 && words[s].scalar_type() == at::kInt &&
                    words[s].is_contiguous(),
                "words: contiguous int32 vectors (the uint32 words' bits)");
    TORCH_CHECK(table[s].dim() == 1 && table[s].scalar_type() == at::kDouble &&
                    table[s].numel() >= 1 && table[s].is_contiguous(),
                "table: float64 vectors of probabilities");
    const bool per_symbol = index[s].numel() > 0;
    TORCH_CHECK(!per_symbol || (index[s].scalar_type() == at::kByte &&
                                index[s].numel() == numel && index[s].is_contiguous()),
                "index: empty, or a uint8 vector of one table entry per symbol");
    const double* probabilities = table[s].const_data_ptr<double>();
    for (int64_t t = 0; t < table[s].numel(); ++t) {
      TORCH_CHECK(probabilities[t] >= 0.0 && probabilities[t] <= 1.0, "p must be in [0, 1]");
      splits[s].push_back(bernoulli_split(probabilities[t]));
    }
    const uint8_t* symbol_index = per_symbol ? index[s].const_data_ptr<uint8_t>() : nullptr;
    for (int64_t i = 0; per_symbol && i < numel; ++i)
      TORCH_CHECK(symbol_index[i] < table[s].numel(), "index out of range");

    const uint32_t* w = reinterpret_cast<const uint32_t*>(words[s].const_data_ptr<int32_t>());
    int64_t remaining = words[s].numel();
    // constriction's from_compressed: no trailing zero word; the state is read from the end
    TORCH_CHECK(remaining == 0 || w[remaining - 1] != 0, "the stream ends in a zero word");
    uint64_t state = 0;
    if (remaining > 0) {
      state = w[--remaining];
      while (remaining > 0 && state < kRefill) state = (state << 32) | w[--remaining];
    }
    const Lane lane{state, w, remaining, bits.mutable_data_ptr<uint8_t>(), numel,
                    splits[s].data(), symbol_index};
    if (numel > 0) (per_symbol ? per_symbol_lanes : shared_lanes).push_back(lane);
  }
  decode_streams<false>(std::move(shared_lanes));
  decode_streams<true>(std::move(per_symbol_lanes));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(popup_adapter, m) {
  m.def(
      "rans_decode_bernoulli_(Tensor(a!)[] out, Tensor[] words, Tensor[] table, Tensor[] index) -> ()");
}

TORCH_LIBRARY_IMPL(popup_adapter, CPU, m) {
  m.impl("rans_decode_bernoulli_", &rans_decode_bernoulli_);
}
