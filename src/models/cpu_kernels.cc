// LayerNorm over the last axis, erf GELU (alone or after a bias), a residual add with a Dense layer's bias,
// attention's q/k/v split (with its bias), softmax and head merge, unfold (T2T's soft split, DeiT's patch cut),
// the T2T performer's per-token scalars and the reuse paths' token resampling (fp32 inference), and the keyed
// dropout masks (training), for MindSpore's CPU backend as AOT custom ops (the `extern "C" int Func(nparam, params,
// ndims, shapes, dtypes, stream, extra)` interface). float32 only; the Python side uses MindSpore's own ops otherwise.
// Built by cpu_kernels.py with -O3 -march=native -ffast-math -fopenmp-simd: -ffast-math lets GCC call glibc's
// vectorised erff (libmvec), which is most of the gain for GELU.
// Work is split over helper threads of our own (HelperPool) rather than OpenMP: libgomp's threads spin after each
// kernel and took the cores from MindSpore's own thread pool (the whole model ran slower with OpenMP than without).
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kMinWorkPerPart = 1 << 15;  // elements; below this a part costs more than it saves
constexpr int kPartsPerCore = 4;

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

// Helper threads that sleep between kernels. Threads started per call waited for a core: MindSpore's thread pool
// keeps the other cores spinning between its ops, and a new thread does not preempt them where a woken sleeper
// does (in a DeiT-S cascade, LayerNorm, GELU and the head permutes ran faster on one thread than on two started
// per call). Helpers never spin, for the same reason: OpenMP's spinning threads made the whole model slower.
// Parts are claimed, not assigned: a kernel wakes only the helpers it can use (no herd of idle helpers on a
// many-core host), and the caller itself takes the parts no helper has woken up for yet.
class HelperPool {
 public:
  explicit HelperPool(int helpers) : owner_(getpid()), helpers_(helpers) {
    for (int helper = 0; helper < helpers; ++helper) std::thread([this] { Serve(); }).detach();
  }

  // Runs part(0) .. part(parts - 1), here and on `wanted` helpers; false (nothing run) when the pool is busy with
  // another caller's kernel, too small, or inherited by a forked child (whose helpers did not survive the fork).
  bool TryRun(int parts, int wanted, const std::function<void(int)> &part) {
    if (wanted > helpers_ || getpid() != owner_) return false;
    std::unique_lock<std::mutex> caller(busy_, std::try_to_lock);
    if (!caller.owns_lock()) return false;
    std::unique_lock<std::mutex> lock(mutex_);
    part_ = &part;
    parts_ = parts;
    next_part_ = 0;
    unfinished_ = parts;
    for (int helper = 0; helper < wanted; ++helper) wake_.notify_one();
    RunClaimedParts(lock);
    done_.wait(lock, [this] { return unfinished_ == 0; });
    return true;
  }

 private:
  // Claims and runs parts until none is left; `lock` holds mutex_ on entry and on return.
  void RunClaimedParts(std::unique_lock<std::mutex> &lock) {
    while (next_part_ < parts_) {
      const int claimed = next_part_++;
      const std::function<void(int)> *part = part_;
      lock.unlock();
      (*part)(claimed);
      lock.lock();
      if (--unfinished_ == 0) done_.notify_one();
    }
  }

  void Serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return next_part_ < parts_; });
      RunClaimedParts(lock);
    }
  }

  const pid_t owner_;
  const int helpers_;
  std::mutex busy_;  // one kernel at a time: MindSpore may launch two kernels at once
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)> *part_ = nullptr;
  int parts_ = 0, next_part_ = 0, unfinished_ = 0;
};

// Calls body(begin, end) on contiguous parts of [0, items), in parallel when there is enough work. A few parts per
// core, claimed as they come: a helper that wakes late leaves the caller fewer parts, not one whole half, to run alone.
template <typename Body>
void ParallelFor(int64_t items, int64_t work_per_item, Body body) {
  static const int cores = UsableCores();
  static HelperPool *const helpers = new HelperPool(cores - 1);  // never destroyed: the helpers outlive exit
  const int64_t by_work = std::max<int64_t>(1, items * work_per_item / kMinWorkPerPart);
  const int parts = static_cast<int>(std::min<int64_t>({kPartsPerCore * cores, by_work, items}));
  const int64_t step = parts > 1 ? (items + parts - 1) / parts : items;
  const std::function<void(int)> part = [&](int p) {
    const int64_t begin = p * step, end = std::min(items, begin + step);
    if (begin < end) body(begin, end);
  };
  if (parts <= 1 || !helpers->TryRun(parts, std::min(parts, cores) - 1, part)) body(0, items);
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

// The exact (erf) GELU, as torch's default.
inline float Gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

// e^x for softmax, in multiply-adds that vectorise inline (the softmax kernel took 12% longer with glibc's vector
// expf): Cephes' expf, e^x = 2^n e^r with |r| <= ln 2 / 2 and a degree-6 polynomial, within 1 ulp of float64's on
// [-87, 0]; x below -87.3 (where e^x leaves the normal floats) gives e^-87.3, 1.2e-38, which a softmax row's sum
// of at least 1 does not see.
inline float Exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &exponent, sizeof(power));
  return p * power;
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
      y[i] = Gelu(x[i]);
    }
  });
  return 0;
}

// GELU of x + bias: a Dense layer's bias added on the way into GELU instead of in a pass of its own; or, given as
// [channels, 1], a 1x1 conv's bias per channel of x [B, channels, width] (the relation reuse MLP).
// params: x [..., width], bias [width] or [channels, 1], y like x
extern "C" int BiasErfGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t width = shapes[0][ndims[0] - 1], rows = ElementCount(ndims[0] - 1, shapes[0]);
  const bool per_channel = ndims[1] == 2 && shapes[1][1] == 1;
  const int64_t channels = shapes[1][0];
  if (per_channel ? ndims[0] < 2 || shapes[0][ndims[0] - 2] != channels : channels != width) return 1;
  ParallelFor(rows, width, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float *in = x + r * width;
      float *out = y + r * width;
      if (per_channel) {
        const float add = bias[r % channels];
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) out[i] = Gelu(in[i] + add);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) out[i] = Gelu(in[i] + bias[i]);
      }
    }
  });
  return 0;
}

// A transformer block's residual add after a Dense layer (fp32 inference): x + rows + bias, the layer's bias added
// on the way instead of in a BiasAdd pass of its own before the Add.
// params: x [..., width], rows [M, width] (the layer's MatMul, as many elements as x), bias [width], y like x
extern "C" int ResidualBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *layer_rows = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t width = shapes[0][ndims[0] - 1], rows = ElementCount(ndims[0] - 1, shapes[0]);
  if (ElementCount(ndims[1], shapes[1]) != rows * width || shapes[2][0] != width) return 1;
  ParallelFor(rows, width, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float *residual = x + r * width, *added = layer_rows + r * width;
      float *out = y + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) out[i] = residual[i] + (added[i] + bias[i]);
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
  const int64_t width = shapes[0][ndims[0] - 1], rows = ElementCount(ndims[0] - 1, shapes[0]);
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

// Attention's head permutations (fp32 inference), copies of head_dim-float rows without the per-element
// offset table that MindSpore's CPU Transpose builds and keeps for a constant perm (8 bytes per element).
// SplitQkv also adds the qkv layer's bias and writes q, k and v apart, in place of a BiasAdd, a transpose and
// three gathers; with one head and one token per row, [B * N, 1, 1, hd], it splits the T2T performer's k, q, v.
// params: qkv [B * N, 3 * H * hd] (a Dense layer's output before its bias), bias [3 * H * hd], q, k, v [B, H, N, hd]
extern "C" int SplitQkv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                        void *stream, void *extra) {
  if (nparam != 5 || ndims[0] != 2 || ndims[2] != 4) return 1;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  float *parts[3] = {static_cast<float *>(params[2]), static_cast<float *>(params[3]), static_cast<float *>(params[4])};
  const int64_t heads = shapes[2][1], tokens = shapes[2][2], width = shapes[2][3], dim = heads * width;
  const int64_t rows = shapes[0][0];
  if (shapes[0][1] != 3 * dim || rows != shapes[2][0] * tokens) return 1;
  ParallelFor(rows, 3 * dim, [=](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t b = row / tokens, n = row % tokens;
      for (int64_t s = 0; s < 3; ++s) {
        for (int64_t h = 0; h < heads; ++h) {
          const float *from = qkv + row * 3 * dim + s * dim + h * width;
          const float *add = bias + s * dim + h * width;
          float *to = parts[s] + ((b * heads + h) * tokens + n) * width;
#pragma omp simd
          for (int64_t i = 0; i < width; ++i) to[i] = from[i] + add[i];
        }
      }
    }
  });
  return 0;
}

// Attention's softmax with the logits it is taken of (fp32 inference): logits = raw * scale (+ bias), then the
// softmax of each row, one row at a time while it is in cache, in place of MindSpore's Mul, Add and Softmax (three
// passes over the whole tensor).
// params: raw [..., N] (q k^T), [bias [..., N],] scale [1], logits [..., N], attn [..., N]
extern "C" int ScaledSoftmax(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 4 && nparam != 5) return 1;
  const bool biased = nparam == 5;
  const float *raw = static_cast<const float *>(params[0]);
  const float *bias = biased ? static_cast<const float *>(params[1]) : nullptr;
  const float scale = *static_cast<const float *>(params[nparam - 3]);
  float *logits = static_cast<float *>(params[nparam - 2]);
  float *attn = static_cast<float *>(params[nparam - 1]);
  const int64_t width = shapes[0][ndims[0] - 1], rows = ElementCount(ndims[0] - 1, shapes[0]);
  if (biased && ElementCount(ndims[1], shapes[1]) != rows * width) return 1;
  ParallelFor(rows, 3 * width, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float *in = raw + r * width;
      float *logit = logits + r * width, *out = attn + r * width;
      if (biased) {
        const float *add = bias + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) logit[i] = in[i] * scale + add[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) logit[i] = in[i] * scale;
      }
      float largest = logit[0];
#pragma omp simd reduction(max : largest)
      for (int64_t i = 1; i < width; ++i) largest = std::max(largest, logit[i]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < width; ++i) sum += out[i] = Exp(logit[i] - largest);
      const float inverse = 1.0f / sum;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) out[i] *= inverse;
    }
  });
  return 0;
}

// params: x [B, H, N, hd], out [B, N, H, hd]
extern "C" int MergeHeads(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 2 || ndims[0] != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  const int64_t batch = shapes[0][0], heads = shapes[0][1], tokens = shapes[0][2], width = shapes[0][3];
  ParallelFor(batch * tokens, heads * width, [=](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      const int64_t b = row / tokens, n = row % tokens;
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(out + row * heads * width + h * width, x + ((b * heads + h) * tokens + n) * width,
                    width * sizeof(float));
      }
    }
  });
  return 0;
}

// The T2T performer's per-token scalars (fp32 inference), fused so that no (B, T, 1) operand is broadcast:
// MindSpore's CPU broadcast arithmetic keeps two 8-byte index tables per output element with the compiled graph.
// params: projections x w^T [..., m], x [..., emb], scale [1], out [..., m] = exp(x w^T - |x|^2 / 2) * scale
extern "C" int PerformerFeatures(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *projections = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const int64_t features = shapes[0][ndims[0] - 1], width = shapes[1][ndims[1] - 1];
  const int64_t rows = ElementCount(ndims[0] - 1, shapes[0]);
  ParallelFor(rows, features + width, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float *token = x + r * width;
      float squares = 0.0f;
      for (int64_t i = 0; i < width; ++i) squares += token[i] * token[i];
      const float half = squares / 2.0f;
#pragma omp simd
      for (int64_t i = 0; i < features; ++i) {
        out[r * features + i] = std::exp(projections[r * features + i] - half) * scale;
      }
    }
  });
  return 0;
}

// params: y [..., W], normaliser [..., 1], epsilon [1], out [..., W] = y / (normaliser + epsilon)
extern "C" int DivideRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *y = static_cast<const float *>(params[0]);
  const float *normaliser = static_cast<const float *>(params[1]);
  const float epsilon = *static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const int64_t width = shapes[0][ndims[0] - 1], rows = ElementCount(ndims[0] - 1, shapes[0]);
  ParallelFor(rows, width, [=](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float divisor = normaliser[r] + epsilon;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) out[r * width + i] = y[r * width + i] / divisor;
    }
  });
  return 0;
}

// torch's unfold (fp32 inference): the windows of a zero-padded map, one row of (channel, y, x) per window, for
// T2T's soft splits and DeiT's patch cut (stride = kernel), in place of MindSpore's CPU Im2Col and the transpose
// after it, or of its pad (about 16 ms for a (4, 3, 230, 230) batch), a crop and a 6-D transpose. The map is an
// image [B, C, H, W] or, as T2T re-folds them, tokens [B, side * side, C] of a square map, read where they lie.
// params: map, geometry [kernel, stride, grid, padding] int32, out [B * grid * grid, C * kernel * kernel]
extern "C" int Unfold(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  if (nparam != 3 || (ndims[0] != 4 && ndims[0] != 3)) return 1;
  const float *map = static_cast<const float *>(params[0]);
  const int32_t *geometry = static_cast<const int32_t *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  const int64_t kernel = geometry[0], stride = geometry[1], grid = geometry[2], padding = geometry[3];
  const bool tokens = ndims[0] == 3;
  const int64_t batch = shapes[0][0], channels = shapes[0][tokens ? 2 : 1];
  const int64_t height = tokens ? std::llround(std::sqrt(static_cast<double>(shapes[0][1]))) : shapes[0][2];
  const int64_t width = tokens ? height : shapes[0][3];
  if (tokens && height * height != shapes[0][1]) return 1;
  // element (b, c, y, x) of the map lies at b * per_map + c * per_channel + y * per_row + x * per_pixel
  const int64_t per_pixel = tokens ? channels : 1, per_channel = tokens ? 1 : height * width;
  const int64_t per_row = width * per_pixel, per_map = channels * height * width;
  const int64_t window = channels * kernel * kernel;
  if (ElementCount(ndims[2], shapes[2]) != batch * grid * grid * window) return 1;
  ParallelFor(batch * grid, grid * window, [=](int64_t first, int64_t last) {
    for (int64_t band = first; band < last; ++band) {  // a row of windows: map b, window row gy
      const int64_t b = band / grid, gy = band % grid;
      for (int64_t gx = 0; gx < grid; ++gx) {
        float *to = out + (band * grid + gx) * window;
        for (int64_t c = 0; c < channels; ++c) {
          const float *plane = map + b * per_map + c * per_channel;
          for (int64_t ky = 0; ky < kernel; ++ky, to += kernel) {
            const int64_t y = gy * stride + ky - padding, left = gx * stride - padding;
            if (y < 0 || y >= height) {
              std::fill(to, to + kernel, 0.0f);
              continue;
            }
            const float *line = plane + y * per_row;
            if (per_pixel == 1 && left >= 0 && left + kernel <= width) {
              std::memcpy(to, line + left, kernel * sizeof(float));
            } else {
              for (int64_t kx = 0, x = left; kx < kernel; ++kx, ++x) {
                to[kx] = (x >= 0 && x < width) ? line[x * per_pixel] : 0.0f;
              }
            }
          }
        }
      }
    }
  });
  return 0;
}

// Token-grid resampling (fp32 inference): the reuse paths' resample matrices have at most a few non-zeros per
// row (nearest x2, then adaptive average pooling), given here as `index` and `weight` [Nd, K] (weight 0 pads).
// A dense matmul by them does about 25x the multiply-adds for 10x10 -> 14x14.
namespace {

struct SparseRows {
  const int32_t *index;
  const float *weight;
  int64_t rows, per_row;
};

SparseRows ReadSparseRows(void **params, int64_t **shapes) {
  return {static_cast<const int32_t *>(params[1]), static_cast<const float *>(params[2]), shapes[1][0],
          shapes[1][1]};
}

// out[i, :] = start + sum_k weight[i, k] * x[index[i, k], :] for rows of `width` floats.
void ResampleRowsOf(const SparseRows &m, const float *x, int64_t width, float *out, float start = 0.0f) {
  for (int64_t i = 0; i < m.rows; ++i) {
    float *row = out + i * width;
    std::fill(row, row + width, start);
    for (int64_t k = 0; k < m.per_row; ++k) {
      const float w = m.weight[i * m.per_row + k];
      const float *from = x + static_cast<int64_t>(m.index[i * m.per_row + k]) * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) row[j] += w * from[j];
    }
  }
}

// out [columns, rows] = in [rows, columns]^T
void Transpose(const float *in, int64_t rows, int64_t columns, float *out) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < columns; ++j) out[j * rows + i] = in[i * columns + j];
  }
}

}  // namespace

// params: x [..., Ns, W], index [Nd, K] int32, weight [Nd, K], out [..., Nd, W]
extern "C" int ResampleTokens(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  if (nparam != 4 || ndims[0] < 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[3]);
  const SparseRows m = ReadSparseRows(params, shapes);
  const int64_t width = shapes[0][ndims[0] - 1], src = shapes[0][ndims[0] - 2];
  const int64_t maps = ElementCount(ndims[0], shapes[0]) / (src * width);
  ParallelFor(maps, m.rows * m.per_row * width, [=](int64_t first, int64_t last) {
    for (int64_t map = first; map < last; ++map) {
      ResampleRowsOf(m, x + map * src * width, width, out + map * m.rows * width);
    }
  });
  return 0;
}

// Both token axes of [..., Ns, Ns] maps: out = R x R^T, R the sparse [Nd, Ns]; with a bias [C, 1], the maps of
// x [B, C, Ns, Ns] are those of a 1x1 conv without its bias, added here: R (x + b) R^T = R x R^T + b, as every
// row of R sums to one (the relation reuse MLP's fc2).
// params: x [..., Ns, Ns], index [Nd, K] int32, weight [Nd, K], [bias [C, 1],] out [..., Nd, Nd]
extern "C" int ResampleTokenPairs(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  if ((nparam != 4 && nparam != 5) || ndims[0] < 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = nparam == 5 ? static_cast<const float *>(params[3]) : nullptr;
  float *out = static_cast<float *>(params[nparam - 1]);
  const SparseRows m = ReadSparseRows(params, shapes);
  const int64_t src = shapes[0][ndims[0] - 1], dst = m.rows;
  const int64_t maps = ElementCount(ndims[0], shapes[0]) / (src * src);
  const int64_t channels = bias ? shapes[3][0] : 1;
  if (bias && (ndims[0] < 3 || shapes[0][ndims[0] - 3] != channels)) return 1;
  ParallelFor(maps, 2 * dst * dst * m.per_row, [=](int64_t first, int64_t last) {
    // Two passes of contiguous row sums, R x^T then R (R x^T)^T = R x R^T; the transposes between them are of
    // maps small enough for the cache, and cheaper than gathering R^T's columns element by element.
    std::vector<float> transposed_x(src * src), rows(dst * src), transposed_rows(src * dst);
    for (int64_t map = first; map < last; ++map) {
      Transpose(x + map * src * src, src, src, transposed_x.data());
      ResampleRowsOf(m, transposed_x.data(), src, rows.data());
      Transpose(rows.data(), dst, src, transposed_rows.data());
      ResampleRowsOf(m, transposed_rows.data(), dst, out + map * dst * dst, bias ? bias[map % channels] : 0.0f);
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
