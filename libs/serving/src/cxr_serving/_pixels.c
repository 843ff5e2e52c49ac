/* Two per-image loops of the serving path in C, each without the GIL.
 *
 * png_unfilter_into: undo PNG's per-row filters for 8-bit, one-sample-per-pixel images (grayscale).
 * Why: libpng (and so OpenCV and Pillow) undoes the Paeth filter one byte at a time with branches;
 * most rows of chest X-ray PNGs use it. With SSE2 (every x86-64 CPU), sixteen rows run at once, one per vector
 * lane, as a diagonal wavefront (below); elsewhere, and for the rows left over, Paeth is branch-free and four
 * consecutive Paeth rows run as a wavefront (row k one pixel behind row k-1), so the CPU overlaps four chains.
 * The result is the PNG specification's reconstruction, byte for byte (tests compare with OpenCV).
 *
 * resize_normalize_into: a uint8 or float32 image -> a separable resize with given weights (the caller passes
 * torch's antialiased bilinear ones) -> value * unit (1 / 255 for uint8) -> (x - sub[c]) / div[c] for each output
 * channel, in one pass over float32 buffers instead of ~10 tensor operations and their temporaries (and, on a
 * decode thread, instead of the OpenMP team those operations would start there); the same float32 operations in
 * the same order as the tensor path, so equal within float32 rounding of the sums.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline int paeth(int a, int b, int c) {
    int pa = abs(b - c), pb = abs(a - c), pc = abs(a + b - 2 * c);
    int best = (pb < pa) ? b : a;
    int dist = (pb < pa) ? pb : pa;
    return (pc < dist) ? c : best;
}

/* One row; `up` is NULL for the first row (the specification's zero row). */
static int unfilter_row(int filter, const uint8_t *src, uint8_t *dst, const uint8_t *up, Py_ssize_t w) {
    Py_ssize_t x;
    switch (filter) {
    case 0:
        memcpy(dst, src, (size_t)w);
        return 0;
    case 1: {
        uint8_t a = 0;
        for (x = 0; x < w; x++) dst[x] = a = (uint8_t)(src[x] + a);
        return 0;
    }
    case 2:
        if (up == NULL) memcpy(dst, src, (size_t)w);
        else for (x = 0; x < w; x++) dst[x] = (uint8_t)(src[x] + up[x]);
        return 0;
    case 3: {
        int a = 0;
        for (x = 0; x < w; x++) {
            int b = up ? up[x] : 0;
            a = (uint8_t)(src[x] + ((a + b) >> 1));
            dst[x] = (uint8_t)a;
        }
        return 0;
    }
    case 4: {
        int a = 0, c = 0;
        for (x = 0; x < w; x++) {
            int b = up ? up[x] : 0;
            a = (uint8_t)(src[x] + paeth(a, b, c));
            dst[x] = (uint8_t)a;
            c = b;
        }
        return 0;
    }
    default:
        return -1;
    }
}

#define STEP(k, x)                                               \
    do {                                                         \
        int b_ = up##k[x];                                       \
        a##k = (uint8_t)(s##k[x] + paeth(a##k, b_, c##k));      \
        d##k[x] = (uint8_t)a##k;                                 \
        c##k = b_;                                               \
    } while (0)


#if defined(__SSE2__)
#include <emmintrin.h>
/* Sixteen rows at once, one per SSE2 lane, as a diagonal wavefront: at step t lane i reconstructs row y0+i at
 * column t-i, so its left neighbour is its own previous result, and the pixels above and above-left are lane i-1's
 * results of the two steps before. Every filter type is computed for every lane and each lane keeps its row's.
 * The rows are read and written 16 columns at a time through 16 x 16 byte transposes, skewed by one column per
 * row. Paeth is worked out in 8 bits: |a + b - 2c| is |b - c| + |a - c| when a - c and b - c have the same sign
 * (saturating at 255, which changes no comparison with values <= 255), else their difference. */
#define LANES 16

static inline __m128i le_u8(__m128i x, __m128i y) { return _mm_cmpeq_epi8(_mm_min_epu8(x, y), x); }
static inline __m128i absdiff_u8(__m128i x, __m128i y) { return _mm_sub_epi8(_mm_max_epu8(x, y), _mm_min_epu8(x, y)); }
static inline __m128i pick(__m128i mask, __m128i yes, __m128i no) {
    return _mm_or_si128(_mm_and_si128(mask, yes), _mm_andnot_si128(mask, no));
}

static inline __m128i paeth_u8(__m128i a, __m128i b, __m128i c) {
    const __m128i pa = absdiff_u8(b, c), pb = absdiff_u8(a, c);
    const __m128i same_sign = _mm_cmpeq_epi8(le_u8(a, c), le_u8(b, c));
    const __m128i pc = pick(same_sign, _mm_adds_epu8(pa, pb), absdiff_u8(pa, pb));
    const __m128i take_a = _mm_and_si128(le_u8(pa, pb), le_u8(pa, pc));
    return pick(take_a, a, pick(le_u8(pb, pc), b, c));
}

static void transpose16(__m128i r[LANES]) {
    __m128i t[LANES];
    int stage, k;
    for (stage = 0; stage < 4; stage++) { /* four perfect shuffles of rows k and k+8 transpose 16 x 16 bytes */
        for (k = 0; k < 8; k++) {
            t[2 * k] = _mm_unpacklo_epi8(r[k], r[k + 8]);
            t[2 * k + 1] = _mm_unpackhi_epi8(r[k], r[k + 8]);
        }
        memcpy(r, t, sizeof t);
    }
}

/* Rows y0 .. y0+15 (filter bytes already checked to be 0-4); `up` is row y0-1's output or NULL. */
static void unfilter_16_rows(const uint8_t *raw, uint8_t *out, Py_ssize_t y0, Py_ssize_t w, const uint8_t *up) {
    const Py_ssize_t stride = w + 1;
    uint8_t filters[LANES], edge[LANES][LANES];
    __m128i v[LANES], prev = _mm_setzero_si128(), prev2 = _mm_setzero_si128();
    const __m128i one = _mm_set1_epi8(1);
    __m128i f, is_sub, is_up, is_avg, is_paeth;
    Py_ssize_t t0, t, i, k, col;
    for (i = 0; i < LANES; i++) filters[i] = raw[(y0 + i) * stride];
    f = _mm_loadu_si128((const __m128i *)filters);
    is_sub = _mm_cmpeq_epi8(f, one);
    is_up = _mm_cmpeq_epi8(f, _mm_set1_epi8(2));
    is_avg = _mm_cmpeq_epi8(f, _mm_set1_epi8(3));
    is_paeth = _mm_cmpeq_epi8(f, _mm_set1_epi8(4));
    for (t0 = 0; t0 < w + LANES - 1; t0 += LANES) {
        const int inside = t0 >= LANES - 1 && t0 + LANES <= w; /* every lane's 16 columns lie in its row */
        for (i = 0; i < LANES; i++) {
            const uint8_t *src = raw + (y0 + i) * stride + 1;
            if (inside) {
                v[i] = _mm_loadu_si128((const __m128i *)(src + t0 - i));
            } else {
                for (k = 0; k < LANES; k++) {
                    col = t0 + k - i;
                    edge[i][k] = (col >= 0 && col < w) ? src[col] : 0;
                }
                v[i] = _mm_loadu_si128((const __m128i *)edge[i]);
            }
        }
        transpose16(v); /* v[k], lane i: row y0+i, column t0+k-i */
        for (k = 0; k < LANES; k++) {
            __m128i a = prev, b, c, avg, pred, o;
            t = t0 + k;
            b = _mm_or_si128(_mm_slli_si128(prev, 1), _mm_cvtsi32_si128(up && t < w ? up[t] : 0));
            c = _mm_or_si128(_mm_slli_si128(prev2, 1), _mm_cvtsi32_si128(up && t >= 1 && t <= w ? up[t - 1] : 0));
            avg = _mm_sub_epi8(_mm_avg_epu8(a, b), _mm_and_si128(_mm_xor_si128(a, b), one));
            pred = _mm_or_si128(_mm_or_si128(_mm_and_si128(is_sub, a), _mm_and_si128(is_up, b)),
                                _mm_or_si128(_mm_and_si128(is_avg, avg), _mm_and_si128(is_paeth, paeth_u8(a, b, c))));
            /* a lane i > t is left of column 0 (only in the first tile, t0 = 0, which is never `inside`: the edge
             * buffer gives it source bytes of 0), and by induction so are its a, b and c (lane i-1 was left of
             * column 0 a step earlier; `up` goes to lane 0 only), so it computes 0: the zero left and above-left
             * neighbours of column 0 */
            o = _mm_add_epi8(v[k], pred);
            v[k] = o;
            prev2 = prev;
            prev = o;
        }
        transpose16(v); /* v[i], byte k: row y0+i, column t0+k-i */
        for (i = 0; i < LANES; i++) {
            uint8_t *dst = out + (y0 + i) * w;
            if (inside) {
                _mm_storeu_si128((__m128i *)(dst + t0 - i), v[i]);
            } else {
                _mm_storeu_si128((__m128i *)edge[i], v[i]);
                for (k = 0; k < LANES; k++) {
                    col = t0 + k - i;
                    if (col >= 0 && col < w) dst[col] = edge[i][k];
                }
            }
        }
    }
}
#endif

/* Returns the first row whose filter byte is not 0-4, or -1 when every row is valid. */
static Py_ssize_t unfilter(const uint8_t *raw, uint8_t *out, Py_ssize_t h, Py_ssize_t w) {
    const Py_ssize_t stride = w + 1;
    Py_ssize_t y = 0;
#if defined(__SSE2__)
    for (y = 0; y < h; y++)
        if (raw[y * stride] > 4) return y;
    y = 0;
#endif
    while (y < h) {
        const uint8_t *row = raw + y * stride;
        uint8_t *dst = out + y * w;
#if defined(__SSE2__)
        if (y + LANES <= h && w >= 2 * LANES) {
            int serial = 0, k; /* rows whose filter needs the left neighbour: what the lanes are for */
            for (k = 0; k < LANES; k++) serial += row[k * stride] == 1 || row[k * stride] >= 3;
            if (serial >= LANES / 4) {
                unfilter_16_rows(raw, out, y, w, y ? dst - w : NULL);
                y += LANES;
                continue;
            }
        }
#endif
        if (y > 0 && y + 4 <= h && w >= 4 && row[0] == 4 && row[stride] == 4 && row[2 * stride] == 4 &&
            row[3 * stride] == 4) {
            const uint8_t *s0 = row + 1, *s1 = s0 + stride, *s2 = s1 + stride, *s3 = s2 + stride;
            uint8_t *d0 = dst, *d1 = d0 + w, *d2 = d1 + w, *d3 = d2 + w;
            const uint8_t *up0 = d0 - w, *up1 = d0, *up2 = d1, *up3 = d2;
            int a0 = 0, a1 = 0, a2 = 0, a3 = 0, c0 = 0, c1 = 0, c2 = 0, c3 = 0;
            Py_ssize_t t;
            STEP(0, 0);
            STEP(0, 1); STEP(1, 0);
            STEP(0, 2); STEP(1, 1); STEP(2, 0);
            for (t = 3; t < w; t++) {
                STEP(0, t); STEP(1, t - 1); STEP(2, t - 2); STEP(3, t - 3);
            }
            STEP(1, w - 1); STEP(2, w - 2); STEP(3, w - 3);
            STEP(2, w - 1); STEP(3, w - 2);
            STEP(3, w - 1);
            y += 4;
        } else {
            if (unfilter_row(row[0], row + 1, dst, y ? dst - w : NULL, w) < 0) return y;
            y += 1;
        }
    }
    return -1;
}

PyDoc_STRVAR(unfilter_into_doc,
             "png_unfilter_into(raw, out, height, width)\n\n"
             "Reconstruct an 8-bit one-sample-per-pixel PNG image: `raw` is the inflated IDAT stream\n"
             "(height rows of a filter byte then width bytes), `out` a writable C-contiguous buffer of\n"
             "height * width bytes. Raises ValueError on a size mismatch or a filter byte above 4.");

static PyObject *unfilter_into(PyObject *self, PyObject *args) {
    Py_buffer raw, out;
    Py_ssize_t h, w, bad;
    int bad_filter = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*nn:png_unfilter_into", &raw, &out, &h, &w)) return NULL;
    if (h <= 0 || w <= 0 || w == PY_SSIZE_T_MAX || h > PY_SSIZE_T_MAX / (w + 1) || raw.len != h * (w + 1) || out.len != h * w ||
        !PyBuffer_IsContiguous(&out, 'C') || !PyBuffer_IsContiguous(&raw, 'C')) {
        PyBuffer_Release(&raw);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "raw must hold height*(width+1) bytes and out height*width");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    bad = unfilter((const uint8_t *)raw.buf, (uint8_t *)out.buf, h, w);
    Py_END_ALLOW_THREADS
    if (bad >= 0) bad_filter = ((const uint8_t *)raw.buf)[bad * (w + 1)];
    PyBuffer_Release(&raw);
    PyBuffer_Release(&out);
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "row %zd has filter type %d (PNG defines 0-4)", bad, bad_filter);
        return NULL;
    }
    Py_RETURN_NONE;
}


/* Weights of one axis: for each output index, the first input index, the tap count and K weights. */
typedef struct {
    Py_buffer lo, n, w;
    Py_ssize_t out, k;
} axis_t;

static int axis_check(axis_t *a, Py_ssize_t in_size, const char *name) {
    const int32_t *lo = (const int32_t *)a->lo.buf, *n = (const int32_t *)a->n.buf;
    const float *w = (const float *)a->w.buf;
    Py_ssize_t i, k;
    if (a->out <= 0 || a->k <= 0 || a->lo.len != a->out * 4 || a->n.len != a->out * 4 || a->w.len != a->out * a->k * 4) {
        PyErr_Format(PyExc_ValueError, "%s weights: lo and n need out int32 values, w out*k float32", name);
        return -1;
    }
    for (i = 0; i < a->out; i++) {
        if (lo[i] < 0 || n[i] < 0 || n[i] > a->k || (Py_ssize_t)lo[i] + n[i] > in_size) {
            PyErr_Format(PyExc_ValueError, "%s weights: output %zd reads outside the input", name, i);
            return -1;
        }
        for (k = n[i]; k < a->k; k++) { /* the column pass reads all K taps where they lie inside the row */
            if (w[i * a->k + k] != 0.0f) {
                PyErr_Format(PyExc_ValueError, "%s weights: output %zd has a weight past its tap count", name, i);
                return -1;
            }
        }
    }
    return 0;
}

static void resize_normalize(const void *src, int src_float, Py_ssize_t in_w, const axis_t *v, const axis_t *h,
                             float *tmp, float *out, float unit, const float *sub, const float *div,
                             Py_ssize_t channels) {
    const int32_t *vlo = (const int32_t *)v->lo.buf, *vn = (const int32_t *)v->n.buf;
    const int32_t *hlo = (const int32_t *)h->lo.buf, *hn = (const int32_t *)h->n.buf;
    const float *vw = (const float *)v->w.buf, *hw = (const float *)h->w.buf;
    const Py_ssize_t oh = v->out, ow = h->out, plane = oh * ow;
    Py_ssize_t i, j, x, c;
    int k;
    for (i = 0; i < oh; i++) { /* rows first, as the tensor path: tmp = Wv @ image */
        float *row = tmp + i * in_w;
        const float *wi = vw + i * v->k;
        for (x = 0; x < in_w; x++) row[x] = 0.0f;
        for (k = 0; k < vn[i]; k++) {
            const Py_ssize_t first = (Py_ssize_t)(vlo[i] + k) * in_w;
            const float wk = wi[k];
            if (src_float) {
                const float *s = (const float *)src + first;
                for (x = 0; x < in_w; x++) row[x] += wk * s[x];
            } else {
                const uint8_t *s = (const uint8_t *)src + first;
                for (x = 0; x < in_w; x++) row[x] += wk * (float)s[x];
            }
        }
    }
    for (i = 0; i < oh; i++) { /* then columns: out = tmp @ Wh^T, scaled, then normalised per channel */
        const float *row = tmp + i * in_w;
        float *first = out + i * ow; /* channel 0's row holds the [0, 1] values until they are normalised */
        for (j = 0; j < ow; j++) {
            const float *wj = hw + j * h->k;
            const float *s = row + hlo[j];
            float acc = 0.0f;
            if (hlo[j] + h->k <= in_w) { /* all K taps inside the row: weights past the count are zero */
                for (k = 0; k < h->k; k++) acc += wj[k] * s[k];
            } else {
                for (k = 0; k < hn[j]; k++) acc += wj[k] * s[k];
            }
            first[j] = acc * unit;
        }
        for (c = channels - 1; c >= 0; c--) { /* channel 0 last: it reads and writes the same row */
            float *dst = out + c * plane + i * ow;
            const float sc = sub[c], dc = div[c];
            for (j = 0; j < ow; j++) dst[j] = (first[j] - sc) / dc;
        }
    }
}

PyDoc_STRVAR(resize_normalize_doc,
             "resize_normalize_into(src, out, height, width, v_lo, v_n, v_w, h_lo, h_n, h_w, unit, sub, div)\n\n"
             "`src` is height*width uint8 or float32 (C order; its buffer format tells which); v_* and h_* the weights of the rows and the columns (int32 first\n"
             "input index and tap count per output index, float32 weights, K per output); `out` a writable buffer\n"
             "of len(sub) * rows_out * cols_out float32: ((resized * unit) - sub[c]) / div[c] for each channel c.");

static PyObject *resize_normalize_into(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    axis_t v, h;
    Py_ssize_t height, width, channels, c, sample;
    float unit, sub[4], div[4], *tmp;
    int src_float, have_src = 0;
    const char *format;
    PyObject *src_obj, *sub_obj, *div_obj, *result = NULL;
    (void)self;
    memset(&v, 0, sizeof v);
    memset(&h, 0, sizeof h);
    if (!PyArg_ParseTuple(args, "Ow*nny*y*y*y*y*y*fOO:resize_normalize_into", &src_obj, &out, &height, &width, &v.lo,
                          &v.n, &v.w, &h.lo, &h.n, &h.w, &unit, &sub_obj, &div_obj))
        return NULL;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    have_src = 1;
    format = src.format == NULL ? "B" : src.format;
    if (format[0] == '=' || format[0] == '@') format++; /* native order, the only one accepted for float32 */
    if (strcmp(format, "B") == 0 && src.itemsize == 1) {
        src_float = 0;
        sample = 1;
    } else if (strcmp(format, "f") == 0 && src.itemsize == 4) {
        src_float = 1;
        sample = 4;
        if (((uintptr_t)src.buf & 3) != 0) { /* read through a float pointer */
            PyErr_SetString(PyExc_ValueError, "src float32 samples must be aligned to 4 bytes");
            goto done;
        }
    } else {
        PyErr_Format(PyExc_ValueError, "src must hold uint8 or native float32 samples, not format '%s'", format);
        goto done;
    }
    channels = PySequence_Size(sub_obj);
    if (channels < 1 || channels > 4 || PySequence_Size(div_obj) != channels) {
        PyErr_SetString(PyExc_ValueError, "sub and div: 1 to 4 channels, the same count");
        goto done;
    }
    for (c = 0; c < channels; c++) {
        PyObject *item = PySequence_GetItem(sub_obj, c);
        if (item == NULL) goto done;
        sub[c] = (float)PyFloat_AsDouble(item);
        Py_DECREF(item);
        if (PyErr_Occurred()) goto done;
        item = PySequence_GetItem(div_obj, c);
        if (item == NULL) goto done;
        div[c] = (float)PyFloat_AsDouble(item);
        Py_DECREF(item);
        if (PyErr_Occurred()) goto done;
    }
    v.out = v.n.len / 4;
    h.out = h.n.len / 4;
    v.k = v.out > 0 ? v.w.len / 4 / v.out : 0;
    h.k = h.out > 0 ? h.w.len / 4 / h.out : 0;
    if (height <= 0 || width <= 0 || height > PY_SSIZE_T_MAX / sample / width || src.len != height * width * sample) {
        PyErr_SetString(PyExc_ValueError, "src must hold height*width samples (uint8 or float32)");
        goto done;
    }
    if (axis_check(&v, height, "row") < 0 || axis_check(&h, width, "column") < 0) goto done;
    if (v.out > PY_SSIZE_T_MAX / 4 / h.out / channels || v.out > PY_SSIZE_T_MAX / 4 / width) {
        PyErr_SetString(PyExc_ValueError, "output too large");
        goto done;
    }
    if (out.len != channels * v.out * h.out * 4 || !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "out must hold channels*rows_out*cols_out float32 values");
        goto done;
    }
    tmp = (float *)PyMem_RawMalloc((size_t)(v.out * width) * sizeof(float));
    if (tmp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    resize_normalize(src.buf, src_float, width, &v, &h, tmp, (float *)out.buf, unit, sub, div, channels);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(tmp);
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (have_src) PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&v.lo);
    PyBuffer_Release(&v.n);
    PyBuffer_Release(&v.w);
    PyBuffer_Release(&h.lo);
    PyBuffer_Release(&h.n);
    PyBuffer_Release(&h.w);
    return result;
}

static PyMethodDef methods[] = {
    {"png_unfilter_into", unfilter_into, METH_VARARGS, unfilter_into_doc},
    {"resize_normalize_into", resize_normalize_into, METH_VARARGS, resize_normalize_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pixels", "Per-image pixel loops of the serving path, without the GIL.", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Single-phase initialisation: the module keeps no state, so nothing is shared between interpreters. */
PyMODINIT_FUNC PyInit__pixels(void) { return PyModule_Create(&module); }
