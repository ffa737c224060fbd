// LayerNorm over the last axis and erf GELU for MindSpore's CPU backend, as AOT custom ops
// (the `extern "C" int Func(nparam, params, ndims, shapes, dtypes, stream, extra)` interface).
// float32 only; the Python side uses them for fp32 inference and MindSpore's own ops otherwise.
// Built by cpu_kernels.py with -O3 -march=native -ffast-math -fopenmp-simd: -ffast-math lets GCC call glibc's
// vectorised erff (libmvec), which is most of the gain for GELU.
// Work is split over short-lived std::threads rather than OpenMP: libgomp's threads spin after each kernel
// and took the cores from MindSpore's own thread pool (the whole model ran slower with OpenMP than without).
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
