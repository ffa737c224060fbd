// LayerNorm over the last axis and erf GELU (fp32 inference), and the keyed dropout masks (training), for
// MindSpore's CPU backend as AOT custom ops (the `extern "C" int Func(nparam, params, ndims, shapes, dtypes,
// stream, extra)` interface). float32 only; the Python side uses MindSpore's own ops otherwise.
// Built by cpu_kernels.py with -O3 -march=native -ffast-math -fopenmp-simd: -ffast-math lets GCC call glibc's
// vectorised erff (libmvec), which is most of the gain for GELU.
// Work is split over short-lived std::threads rather than OpenMP: libgomp's threads spin after each kernel
// and took the cores from MindSpore's own thread pool (the whole model ran slower with OpenMP than without).
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kMinWorkPerThread = 1 << 15;  // elements; below this a thread costs more than it saves

int64_t ElementCount(int ndim, const int64_t *shape) {
  int64_t count = 1;
  for (int i = 0; i < ndim; ++i) count *= shape[i];
  return count;
}

int UsableCores() {
  cpu_set_t cores;
  if (sched_getaffinity(0, sizeof(cores), &cores) == 0) return std::max(1, CPU_COUNT(&cores));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Calls body(begin, end) on contiguous parts of [0, items), in parallel when there is enough work.
template <typename Body>
void ParallelFor(int64_t items, int64_t work_per_item, Body body) {
  static const int cores = UsableCores();
  const int64_t by_work = std::max<int64_t>(1, items * work_per_item / kMinWorkPerThread);
  const int parts = static_cast<int>(std::min<int64_t>({cores, by_work, items}));
  if (parts <= 1) {
    body(0, items);
    return;
  }
  std::vector<std::thread> helpers;
  helpers.reserve(parts - 1);
  const int64_t step = (items + parts - 1) / parts;
  for (int p = 1; p < parts; ++p) {
    const int64_t begin = p * step, end = std::min(items, begin + step);
    if (begin < end) helpers.emplace_back(body, begin, end);
  }
  body(0, std::min(items, step));
  for (auto &helper : helpers) helper.join();
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// splitmix64's output function: a bijection of 64-bit words whose every output bit depends on every input bit.
uint64_t Mix(uint64_t z) {
  z += kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint32_t Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// The 24-bit draw of element `index` holding `value`, under `salt` (src/models/dropout.py documents the scheme).
uint64_t ElementDraw(uint64_t salt, int64_t index, float value) {
  return Mix(Mix(salt + static_cast<uint64_t>(index) * kGolden) ^ Bits(value)) >> 40;
}

}  // namespace

// params: x, y
extern "C" int ErfGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                       void *stream, void *extra) {
  if (nparam != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t count = ElementCount(ndims[0], shapes[0]);
  ParallelFor(count, 1, [x, y](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      y[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
    }
  });
  return 0;
}

// params: x [..., width], gamma [width], beta [width], epsilon [1], y [..., width]
extern "C" int LayerNormLastAxis(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  if (nparam != 5) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float epsilon = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = ElementCount(ndims[0], shapes[0]) / width;
  ParallelFor(rows, width, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float *row = x + r * width;
      float *out = y + r * width;
      float sum = 0.0f;
      for (int64_t i = 0; i < width; ++i) sum += row[i];
      const float mean = sum / static_cast<float>(width);
      float squares = 0.0f;  // two passes: the variance of values far from zero stays exact
      for (int64_t i = 0; i < width; ++i) {
        const float centred = row[i] - mean;
        squares += centred * centred;
      }
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(width) + epsilon);
      for (int64_t i = 0; i < width; ++i) out[i] = (row[i] - mean) * scale * gamma[i] + beta[i];
    }
  });
  return 0;
}

namespace {

// params of both mask kernels: x, key [salt, threshold] (int64), scale [1] (float), mask.
struct MaskParams {
  const float *x;
  uint64_t salt;
  uint64_t threshold;
  float scale;
  float *mask;
};

MaskParams ReadMaskParams(void **params) {
  const int64_t *key = static_cast<const int64_t *>(params[1]);
  return {static_cast<const float *>(params[0]), static_cast<uint64_t>(key[0]), static_cast<uint64_t>(key[1]),
          *static_cast<const float *>(params[2]), static_cast<float *>(params[3])};
}

}  // namespace

// mask has the shape of x: 0 where the element's draw is below threshold, else scale.
extern "C" int KeyedDropoutMask(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 4) return 1;
  const MaskParams p = ReadMaskParams(params);
  const int64_t count = ElementCount(ndims[0], shapes[0]);
  ParallelFor(count, 4, [p](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) p.mask[i] = ElementDraw(p.salt, i, p.x[i]) < p.threshold ? 0.0f : p.scale;
  });
  return 0;
}

// x is [B, ...], mask [B, 1, ...]: one draw per sample, from the wrapping sum of its elements' mixed
// (position, value) words, so that it depends on the whole sample.
extern "C" int KeyedSampleMask(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 4) return 1;
  const MaskParams p = ReadMaskParams(params);
  const int64_t samples = shapes[0][0];
  const int64_t width = samples ? ElementCount(ndims[0], shapes[0]) / samples : 0;
  ParallelFor(samples, width * 4, [p, width](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const float *row = p.x + b * width;
      uint64_t sum = 0;
      for (int64_t j = 0; j < width; ++j) sum += Mix((static_cast<uint64_t>(j) << 32) | Bits(row[j]));
      p.mask[b] = (Mix(p.salt ^ sum) >> 40) < p.threshold ? 0.0f : p.scale;
    }
  });
  return 0;
}
