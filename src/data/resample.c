/* Pillow's bilinear / bicubic resize of 8-bit RGB, bit for bit, computing only a window of the output.

   The recipe's RandomResizedCrop resizes a crop and the eval transform resizes the whole image only to cut a
   centre crop out of it; Pillow resamples every output pixel of the full size. Each output pixel depends only on
   its own filter taps, so computing the window alone gives the same values. The arithmetic is Pillow's
   (libImaging/Resample.c, 8 bits per channel): coefficients in double, normalised to 22-bit fixed point, two
   separable passes with rounding and clipping to 0..255 after each. Build without -ffast-math or FMA contraction,
   which would change the doubles' rounding.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS (32 - 8 - 2)
#define CHANNELS 3

enum { FILTER_BILINEAR = 2, FILTER_BICUBIC = 3 }; /* PIL's Image.BILINEAR, Image.BICUBIC */

static double bilinear(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* Fixed-point taps of outputs first..first+count-1 of an in_size -> out_size resize: for each, the first input
   index and the tap count in bounds, ksize coefficients in taps. Returns ksize, 0 when out of memory. */
static int taps(int in_size, int out_size, int first, int count, int filter, int *bounds, int32_t **taps_out) {
    double (*kernel)(double) = filter == FILTER_BICUBIC ? bicubic : bilinear;
    double support = filter == FILTER_BICUBIC ? 2.0 : 1.0;
    double scale = (double)((float)in_size - 0.0f) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    support *= filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *weights = malloc(sizeof(double) * ksize);
    int32_t *fixed = calloc((size_t)count * ksize, sizeof(int32_t));
    if (!weights || !fixed) {
        free(weights);
        free(fixed);
        return 0;
    }
    for (int i = 0; i < count; i++) {
        double center = 0.0 + (first + i + 0.5) * scale;
        double sum = 0.0, ss = 1.0 / filterscale;
        int lo = (int)(center - support + 0.5);
        if (lo < 0) lo = 0;
        int hi = (int)(center + support + 0.5);
        if (hi > in_size) hi = in_size;
        hi -= lo;
        for (int x = 0; x < hi; x++) {
            double w = kernel((x + lo - center + 0.5) * ss);
            weights[x] = w;
            sum += w;
        }
        for (int x = 0; x < hi; x++) {
            double w = sum != 0.0 ? weights[x] / sum : weights[x];
            fixed[i * ksize + x] = w < 0 ? (int32_t)(-0.5 + w * (1 << PRECISION_BITS))
                                         : (int32_t)(0.5 + w * (1 << PRECISION_BITS));
        }
        bounds[2 * i] = lo;
        bounds[2 * i + 1] = hi;
    }
    free(weights);
    *taps_out = fixed;
    return ksize;
}

static inline uint8_t clip8(int value) {
    value >>= PRECISION_BITS;
    return value < 0 ? 0 : value > 255 ? 255 : (uint8_t)value;
}

#if defined(__SSE4_1__)
#include <immintrin.h>
#endif

/* The three channels of a 4-byte pixel (Pillow's RGBX storage) and its spare byte, as int32 lanes. */
typedef int32_t pixel_sums __attribute__((vector_size(4 * sizeof(int32_t))));
static inline pixel_sums load_rgbx(const uint8_t *pixel) {
#if defined(__SSE4_1__)
    int32_t word;
    memcpy(&word, pixel, sizeof(word));
    return (pixel_sums)_mm_cvtepu8_epi32(_mm_cvtsi32_si128(word));
#else
    typedef uint8_t bytes4 __attribute__((vector_size(4)));
    bytes4 bytes;
    memcpy(&bytes, pixel, sizeof(bytes));
    return __builtin_convertvector(bytes, pixel_sums);
#endif
}

/* Horizontal pass: for each of `rows` rows (row r at src + r * src_stride, pixels `step` = 3 or 4 bytes apart),
   the outputs i = 0..count-1 from taps (bounds relative to the row's start), written as packed RGB at
   dst + r * dst_stride. The integer sums are exact, so summing a 4-byte pixel's channels side by side in one
   vector gives Pillow's values. */
static void horizontal(const uint8_t *src, size_t src_stride, int step, int rows, int count, const int *bounds,
                       const int32_t *k_all, int ksize, uint8_t *dst, size_t dst_stride) {
    for (int r = 0; r < rows; r++) {
        const uint8_t *line = src + r * src_stride;
        uint8_t *out = dst + r * dst_stride;
        for (int i = 0; i < count; i++) {
            const int32_t *k = k_all + (size_t)i * ksize;
            const uint8_t *p = line + (size_t)bounds[2 * i] * step;
            if (step == 4) {
                pixel_sums s = {1 << (PRECISION_BITS - 1), 1 << (PRECISION_BITS - 1), 1 << (PRECISION_BITS - 1), 0};
                for (int x = 0; x < bounds[2 * i + 1]; x++) s += load_rgbx(p + 4 * x) * k[x];
                for (int c = 0; c < CHANNELS; c++) out[CHANNELS * i + c] = clip8(s[c]);
                continue;
            }
            int s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
            for (int x = 0; x < bounds[2 * i + 1]; x++) {
                s0 += p[step * x] * k[x];
                s1 += p[step * x + 1] * k[x];
                s2 += p[step * x + 2] * k[x];
            }
            out[CHANNELS * i] = clip8(s0);
            out[CHANNELS * i + 1] = clip8(s1);
            out[CHANNELS * i + 2] = clip8(s2);
        }
    }
}

/* Vertical pass: output row j = 0..count-1 of `bytes` bytes from the source rows its taps name (row y at
   src + y * src_stride), written at dst + j * dst_stride; `sums` holds one row of accumulators. */
static void vertical(const uint8_t *src, size_t src_stride, int count, size_t bytes, const int *bounds,
                     const int32_t *k_all, int ksize, uint8_t *dst, size_t dst_stride, int32_t *sums) {
    for (int j = 0; j < count; j++) {
        const int32_t *k = k_all + (size_t)j * ksize;
        const uint8_t *base = src + (size_t)bounds[2 * j] * src_stride;
        for (size_t c = 0; c < bytes; c++) sums[c] = 1 << (PRECISION_BITS - 1);
        for (int y = 0; y < bounds[2 * j + 1]; y++) {
            const uint8_t *line = base + (size_t)y * src_stride;
            const int32_t weight = k[y];
            for (size_t c = 0; c < bytes; c++) sums[c] += line[c] * weight;  /* the same integer sums, row-wise */
        }
        uint8_t *out = dst + j * dst_stride;
        for (size_t c = 0; c < bytes; c++) out[c] = clip8(sums[c]);
    }
}

/* `rows` rows of `count` pixels (`step` = 3 or 4 bytes apart in src) copied as packed RGB. */
static void copy_pixels(const uint8_t *src, size_t src_stride, int step, int rows, int count, uint8_t *dst,
                        size_t dst_stride) {
    for (int r = 0; r < rows; r++) {
        const uint8_t *line = src + r * src_stride;
        uint8_t *out = dst + r * dst_stride;
        if (step == CHANNELS) {
            memcpy(out, line, (size_t)count * CHANNELS);
            continue;
        }
        for (int i = 0; i < count; i++) memcpy(out + CHANNELS * i, line + (size_t)step * i, CHANNELS);
    }
}

/* Resize the crop (x0, y0, width, height) of a row-major RGB image (row stride `stride` bytes, pixels `step` = 3
   bytes apart, or 4 as Pillow stores RGB) to out_w x out_h and write the output window (wx, wy, ww, wh) to `dst`
   (wh rows of ww packed RGB pixels). The passes run in Pillow's order: horizontal first, except with
   `pillow13_order` when the height shrinks by more than twice as many pixels as the width (Pillow 13's rule).
   Returns 0, or -1 for bad arguments or no memory. */
int dvt_resize_window(const uint8_t *src, int stride, int step, int x0, int y0, int width, int height, int out_w,
                      int out_h, int wx, int wy, int ww, int wh, int filter, int pillow13_order, uint8_t *dst) {
    if ((filter != FILTER_BILINEAR && filter != FILTER_BICUBIC) || (step != 3 && step != 4) || width <= 0 ||
        height <= 0 || out_w <= 0 || out_h <= 0 || ww <= 0 || wh <= 0 || wx < 0 || wy < 0 || wx + ww > out_w ||
        wy + wh > out_h)
        return -1;
    int need_horizontal = out_w != width, need_vertical = out_h != height;
    int vertical_first = pillow13_order && height - out_h > 0 && height - out_h > (width - out_w) * 2;
    int *vbounds = malloc(sizeof(int) * 2 * wh), *hbounds = malloc(sizeof(int) * 2 * ww);
    int32_t *vtaps = NULL, *htaps = NULL;
    uint8_t *temp = NULL;
    int32_t *sums = NULL;
    int status = -1, vk = 0, hk = 0;
    if (!vbounds || !hbounds) goto done;
    if (need_vertical && !(vk = taps(height, out_h, wy, wh, filter, vbounds, &vtaps))) goto done;
    if (need_horizontal && !(hk = taps(width, out_w, wx, ww, filter, hbounds, &htaps))) goto done;
    const uint8_t *crop = src + (size_t)y0 * stride + (size_t)x0 * step;
    size_t out_stride = (size_t)ww * CHANNELS;
    if (!vertical_first) {
        /* rows of the crop the vertical pass reads, each cut to the window's columns */
        int first = need_vertical ? vbounds[0] : wy;
        int rows = need_vertical ? vbounds[2 * (wh - 1)] + vbounds[2 * (wh - 1) + 1] - first : wh;
        if (!(temp = malloc((size_t)rows * out_stride)) || !(sums = malloc(sizeof(int32_t) * out_stride))) goto done;
        if (need_horizontal)
            horizontal(crop + (size_t)first * stride, stride, step, rows, ww, hbounds, htaps, hk, temp, out_stride);
        else
            copy_pixels(crop + (size_t)first * stride + (size_t)wx * step, stride, step, rows, ww, temp, out_stride);
        if (need_vertical) {
            for (int j = 0; j < wh; j++) vbounds[2 * j] -= first;
            vertical(temp, out_stride, wh, out_stride, vbounds, vtaps, vk, dst, out_stride, sums);
        } else {
            copy_pixels(temp, out_stride, CHANNELS, wh, ww, dst, out_stride);
        }
    } else {
        /* columns of the crop the horizontal pass reads, over the window's rows */
        int first = need_horizontal ? hbounds[0] : wx;
        int cols = need_horizontal ? hbounds[2 * (ww - 1)] + hbounds[2 * (ww - 1) + 1] - first : ww;
        size_t temp_stride = (size_t)cols * step; /* the source's pixel layout */
        if (!(temp = malloc((size_t)wh * temp_stride)) || !(sums = malloc(sizeof(int32_t) * temp_stride))) goto done;
        vertical(crop + (size_t)first * step, stride, wh, temp_stride, vbounds, vtaps, vk, temp, temp_stride, sums);
        if (need_horizontal) {
            for (int i = 0; i < ww; i++) hbounds[2 * i] -= first;
            horizontal(temp, temp_stride, step, wh, ww, hbounds, htaps, hk, dst, out_stride);
        } else {
            copy_pixels(temp, temp_stride, step, wh, ww, dst, out_stride);
        }
    }
    status = 0;
done:
    free(vbounds);
    free(hbounds);
    free(vtaps);
    free(htaps);
    free(temp);
    free(sums);
    return status;
}
