/* Pillow's affine transform of 8-bit RGB with bilinear or bicubic resampling and a fill colour, bit for bit.

   RandAugment's rotate, shear and translate are `Image.transform(size, AFFINE, matrix, resample, fillcolor)`.
   Pillow runs them through its generic transform engine (libImaging/Geometry.c): per output pixel a call of the
   coordinate map and a call of the filter, which clips the taps' coordinates again for every band. Here the
   coordinates, clipped taps and fractions are computed once per pixel and the three bands share them; every
   double is computed with Pillow's operations in Pillow's order, so the bytes are the same. Build without
   -ffast-math or FMA contraction, which would change the doubles' rounding.
*/
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHANNELS 3

enum { FILTER_BILINEAR = 2, FILTER_BICUBIC = 3 }; /* PIL's Image.BILINEAR, Image.BICUBIC */

static inline int floor_int(double v) { return v < 0.0 ? (int)floor(v) : (int)v; }

static inline int clip_index(int v, int size) { return v < 0 ? 0 : v < size ? v : size - 1; }

/* Pillow's filters sample at pixel centres: the pixel at or left of coordinate - 0.5, and the fraction past it. */
static inline int centre_split(double coordinate, double *fraction) {
    coordinate -= 0.5;
    int index = floor_int(coordinate);
    *fraction = coordinate - index;
    return index;
}

/* The three bands of a pixel (and a spare lane) side by side: GCC's vector extension, so each lane runs exactly
   the scalar double operations Pillow runs for its band (IEEE, no contraction), on whatever SIMD the CPU has. */
typedef double bands_d __attribute__((vector_size(4 * sizeof(double))));
/* A pixel's three bytes and the byte after it (the spare lane, never stored): one 4-byte load. */
#if defined(__AVX__) && defined(__SSE4_1__)
#include <immintrin.h>
static inline bands_d load_bands(const uint8_t *pixel) {
    int32_t word;
    memcpy(&word, pixel, sizeof(word));
    return (bands_d)_mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(word)));
}
#else
typedef uint8_t bands_u8 __attribute__((vector_size(4)));
static inline bands_d load_bands(const uint8_t *pixel) {
    bands_u8 value;
    memcpy(&value, pixel, sizeof(value));
    return __builtin_convertvector(value, bands_d);
}
#endif

/* Pillow's cubic through four samples at fraction d (Geometry.c's BICUBIC, operation for operation). On 8-bit
   samples Pillow's p-terms are int expressions; in doubles they are the same integers, exactly. */
static inline bands_d cubic(bands_d v1, bands_d v2, bands_d v3, bands_d v4, double d) {
    bands_d p1 = v2;
    bands_d p2 = -v1 + v3;
    bands_d p3 = 2 * (v1 - v2) + v3 - v4;
    bands_d p4 = -v1 + v2 - v3 + v4;
    return p1 + d * (p2 + d * (p3 + d * p4));
}

/* At fraction 0 a cubic is its second sample and a line its first, exactly (p + 0 * finite = p, and no sample is
   -0): shears and translations along one axis have fraction 0 along the other, so they skip that pass. */
static inline bands_d cubic_row(const uint8_t *row, const int *xs, double d) {
    if (d == 0.0) return load_bands(row + xs[1]);
    return cubic(load_bands(row + xs[0]), load_bands(row + xs[1]), load_bands(row + xs[2]), load_bands(row + xs[3]),
                 d);
}

static inline bands_d linear_row(const uint8_t *row, int x0, int x1, double d) {
    bands_d a = load_bands(row + x0);
    if (d == 0.0) return a;
    return a + (load_bands(row + x1) - a) * d;
}

static void bilinear_pixel(const uint8_t *src, int stride, int step, int width, int height, double xin, double yin,
                           uint8_t *out) {
    double dx, dy;
    int x = centre_split(xin, &dx), y = centre_split(yin, &dy);
    int x0 = clip_index(x, width) * step, x1 = clip_index(x + 1, width) * step;
    bands_d v1 = linear_row(src + (size_t)clip_index(y, height) * stride, x0, x1, dx);
    if (dy != 0.0) {
        bands_d v2 = y + 1 >= 0 && y + 1 < height ? linear_row(src + (size_t)(y + 1) * stride, x0, x1, dx) : v1;
        v1 = v1 + (v2 - v1) * dy;
    }
    for (int b = 0; b < CHANNELS; b++) out[b] = (uint8_t)v1[b];
}

static void bicubic_pixel(const uint8_t *src, int stride, int step, int width, int height, double xin, double yin,
                          uint8_t *out) {
    double dx, dy;
    int x = centre_split(xin, &dx) - 1, y = centre_split(yin, &dy) - 1;
    int xs[4];
    for (int i = 0; i < 4; i++) xs[i] = clip_index(x + i, width) * step;
    /* rows y..y+3: the first clipped into the image, each later one outside it repeats the one before */
    bands_d value;
    if (dy == 0.0) { /* the second row alone: yin - 0.5 is the integer y + 1 >= 0, inside the image */
        value = cubic_row(src + (size_t)(y + 1) * stride, xs, dx);
    } else {
        bands_d v[4];
        v[0] = cubic_row(src + (size_t)clip_index(y, height) * stride, xs, dx);
        for (int i = 1; i < 4; i++)
            v[i] = y + i >= 0 && y + i < height ? cubic_row(src + (size_t)(y + i) * stride, xs, dx) : v[i - 1];
        value = cubic(v[0], v[1], v[2], v[3], dy);
    }
    for (int b = 0; b < CHANNELS; b++) out[b] = value[b] <= 0.0 ? 0 : value[b] >= 255.0 ? 255 : (uint8_t)value[b];
}

/* `Image.transform((out_w, out_h), AFFINE, matrix, filter, fillcolor=fill)` of a row-major RGB image (width x
   height, row stride `stride` bytes, pixels `step` = 3 or 4 bytes apart as Pillow stores RGB, readable one byte
   past its last pixel) into `dst` (out_h rows of out_w RGB pixels, packed). Output pixel (x, y) samples the input
   at matrix . (x + 0.5, y + 0.5, 1); outside the input it keeps the fill colour. Returns 0, or -1 for a bad
   filter, step or size. */
int dvt_affine_rgb(const uint8_t *src, int stride, int step, int width, int height, const double *matrix, int filter,
                   const uint8_t *fill, int out_w, int out_h, uint8_t *dst) {
    if ((filter != FILTER_BILINEAR && filter != FILTER_BICUBIC) || (step != 3 && step != 4) || width <= 0 ||
        height <= 0 || out_w <= 0 || out_h <= 0)
        return -1;
    double a0 = matrix[0], a1 = matrix[1], a2 = matrix[2], a3 = matrix[3], a4 = matrix[4], a5 = matrix[5];
    for (int y = 0; y < out_h; y++) {
        uint8_t *out = dst + (size_t)y * out_w * CHANNELS;
        double yc = y + 0.5;
        for (int x = 0; x < out_w; x++, out += CHANNELS) {
            double xc = x + 0.5;
            double xin = a0 * xc + a1 * yc + a2;
            double yin = a3 * xc + a4 * yc + a5;
            if (xin < 0.0 || xin >= width || yin < 0.0 || yin >= height) {
                memcpy(out, fill, CHANNELS);
            } else if (filter == FILTER_BILINEAR) {
                bilinear_pixel(src, stride, step, width, height, xin, yin, out);
            } else {
                bicubic_pixel(src, stride, step, width, height, xin, yin, out);
            }
        }
    }
    return 0;
}
