// The seeded base drawn at memory speed (see popup_adapter/seeding.py, the reference).
//
// philox_fill_: a float32 tensor filled from one Philox-4x64-10 stream with the same words
// numpy's np.random.Philox(key) gives (word j is block j / 4 + 1 of the counter, entry j % 4)
// and the same transforms, operation for operation in float64 (frexp, sqrt, +, -, *, / and
// the same series coefficients; built with -ffp-contract=off so no product is fused), so every
// value has the reference's bits. Counter-based: any range of a stream is computed on its own,
// so the tensor is filled by all threads in one pass, without float64 temporaries, or by the
// calling thread alone (parallel=false) where the caller's other threads hold the cores.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr uint64_t kM0 = 0xD2E7470EE14C6C93ULL, kM1 = 0xCA5A826395121157ULL;
constexpr uint64_t kW0 = 0x9E3779B97F4A7C15ULL, kW1 = 0xBB67AE8584CAA73BULL;
constexpr int64_t kGrain = 1 << 15;  // elements per task

// what the values are (seeding.py's names)
enum Kind : int64_t { kSigns = 0, kSymmetricUniform = 1, kNormal = 2 };

struct Block {
  uint64_t v[4];
};

inline Block philox(uint64_t counter, uint64_t k0, uint64_t k1) {
  uint64_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const unsigned __int128 p0 = static_cast<unsigned __int128>(kM0) * c0;
    const unsigned __int128 p1 = static_cast<unsigned __int128>(kM1) * c2;
    const uint64_t hi0 = static_cast<uint64_t>(p0 >> 64), lo0 = static_cast<uint64_t>(p0);
    const uint64_t hi1 = static_cast<uint64_t>(p1 >> 64), lo1 = static_cast<uint64_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// word j of the stream (numpy increments the counter before its first block)
struct Words {
  uint64_t k0, k1;
  uint64_t cached_block = ~0ULL;
  Block block{};
  uint64_t operator()(uint64_t j) {
    if (j / 4 != cached_block) {
      cached_block = j / 4;
      block = philox(cached_block + 1, k0, k1);
    }
    return block.v[j % 4];
  }
};

inline double unit(uint64_t word) { return static_cast<double>(word >> 11) * 0x1p-53; }

// seeding._log: frexp, the atanh series in s^2, exponent * ln 2
inline double series_log(double x) {
  int exponent = 0;
  double mantissa = std::frexp(x, &exponent);
  if (mantissa < std::sqrt(0.5)) {
    mantissa = mantissa * 2.0;
    exponent -= 1;
  }
  const double s = (mantissa - 1.0) / (mantissa + 1.0);
  const double s2 = s * s;
  double series = 1.0 / 25.0;
  for (int i = 11; i >= 0; --i) series = series * s2 + 1.0 / (2 * i + 1);
  return 2.0 * s * series + static_cast<double>(exponent) * 0.6931471805599453;
}

// (-1)^n / m!, as Python computes (-1.0) ** n / math.factorial(m): the integer rounded to
// double once, then divided
inline double taylor(int n, int m) {
  uint64_t factorial = 1;
  for (int i = 2; i <= m; ++i) factorial *= static_cast<uint64_t>(i);
  return (n % 2 ? -1.0 : 1.0) / static_cast<double>(factorial);
}

struct Taylor {
  double sin[10], cos[10];
  Taylor() {
    for (int n = 0; n < 10; ++n) {
      sin[n] = taylor(n, 2 * n + 1);
      cos[n] = taylor(n, 2 * n);
    }
  }
};

// seeding._sin_cos_turns: sin and cos of 2 pi u by quadrant reduction
inline void sin_cos_turns(double u, const Taylor& t, double& sin_out, double& cos_out) {
  const double quadrant = std::nearbyint(4.0 * u);
  const double theta = (4.0 * u - quadrant) * (3.141592653589793 / 2);
  const double t2 = theta * theta;
  double sin = 0.0, cos = 0.0;
  for (int n = 9; n >= 0; --n) {
    sin = sin * t2 + t.sin[n];
    cos = cos * t2 + t.cos[n];
  }
  sin = sin * theta;
  switch (static_cast<int64_t>(quadrant) % 4) {
    case 0: sin_out = sin; cos_out = cos; break;
    case 1: sin_out = cos; cos_out = -sin; break;
    case 2: sin_out = -sin; cos_out = -cos; break;
    default: sin_out = -cos; cos_out = sin; break;
  }
}

// body(first, last) over [0, count): on every thread, or on this one
template <typename Body>
void for_range(bool parallel, int64_t count, int64_t grain, const Body& body) {
  if (parallel) {
    at::parallel_for(0, count, grain, body);
  } else if (count > 0) {
    body(0, count);
  }
}

at::Tensor& philox_fill_(at::Tensor& out, int64_t key0, int64_t key1, int64_t kind,
                         double scale, bool parallel) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "a contiguous CPU tensor expected");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "a float32 tensor expected");
  TORCH_CHECK(kind >= kSigns && kind <= kNormal, "unknown kind");
  float* o = out.mutable_data_ptr<float>();
  const int64_t numel = out.numel();
  const uint64_t k0 = static_cast<uint64_t>(key0), k1 = static_cast<uint64_t>(key1);
  if (kind == kSigns) {
    // bit b of word w is value w * 64 + b: set gives +scale, clear -scale (as float32 bit
    // patterns selected by integer arithmetic, so the 64 writes vectorize)
    const float positive = static_cast<float>(scale), negative = -positive;
    uint32_t plus = 0, minus = 0;
    std::memcpy(&plus, &positive, 4);
    std::memcpy(&minus, &negative, 4);
    uint32_t* bits_out = reinterpret_cast<uint32_t*>(o);
    for_range(parallel, (numel + 63) / 64, kGrain / 64, [&](int64_t first, int64_t last) {
      Words words{k0, k1};
      for (int64_t w = first; w < last; ++w) {
        const uint64_t bits = words(static_cast<uint64_t>(w));
        const int64_t begin = w * 64, count = std::min<int64_t>(64, numel - begin);
        uint32_t* block = bits_out + begin;
        if (count == 64) {
          for (int b = 0; b < 64; ++b)
            block[b] = minus ^ ((plus ^ minus) & (0u - static_cast<uint32_t>((bits >> b) & 1)));
        } else {
          for (int b = 0; b < count; ++b) block[b] = (bits >> b) & 1 ? plus : minus;
        }
      }
    });
  } else if (kind == kSymmetricUniform) {
    for_range(parallel, numel, kGrain, [&](int64_t first, int64_t last) {
      Words words{k0, k1};
      for (int64_t i = first; i < last; ++i)
        o[i] = static_cast<float>((unit(words(static_cast<uint64_t>(i))) * 2.0 - 1.0) * scale);
    });
  } else {  // Box-Muller: pair i's cosine at i, its sine at pairs + i
    const int64_t pairs = (numel + 1) / 2;
    const Taylor taylor;
    for_range(parallel, pairs, kGrain, [&](int64_t first, int64_t last) {
      Words words{k0, k1};
      for (int64_t i = first; i < last; ++i) {
        const double u1 = unit(words(2 * static_cast<uint64_t>(i))) + 0x1p-53;
        const double radius = std::sqrt(-2.0 * series_log(u1));
        double sin = 0, cos = 0;
        sin_cos_turns(unit(words(2 * static_cast<uint64_t>(i) + 1)), taylor, sin, cos);
        o[i] = static_cast<float>(radius * cos * scale);
        if (pairs + i < numel) o[pairs + i] = static_cast<float>(radius * sin * scale);
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(popup_adapter, m) {
  m.def(
      "philox_fill_(Tensor(a!) out, int key0, int key1, int kind, float scale, "
      "bool parallel=True) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(popup_adapter, CPU, m) { m.impl("philox_fill_", &philox_fill_); }
