/* Undo PNG's per-row filters for 8-bit, one-sample-per-pixel images (grayscale), without the GIL.
 *
 * Why: libpng (and so OpenCV and Pillow) undoes the Paeth filter one byte at a time with branches;
 * most rows of chest X-ray PNGs use it. Here Paeth is branch-free and four consecutive Paeth rows run
 * as a wavefront (row k one pixel behind row k-1), so the CPU overlaps four dependency chains.
 * The result is the PNG specification's reconstruction, byte for byte (tests compare with OpenCV).
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

/* Returns the first row whose filter byte is not 0-4, or -1 when every row is valid. */
static Py_ssize_t unfilter(const uint8_t *raw, uint8_t *out, Py_ssize_t h, Py_ssize_t w) {
    const Py_ssize_t stride = w + 1;
    Py_ssize_t y = 0;
    while (y < h) {
        const uint8_t *row = raw + y * stride;
        uint8_t *dst = out + y * w;
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
             "unfilter_into(raw, out, height, width)\n\n"
             "Reconstruct an 8-bit one-sample-per-pixel PNG image: `raw` is the inflated IDAT stream\n"
             "(height rows of a filter byte then width bytes), `out` a writable C-contiguous buffer of\n"
             "height * width bytes. Raises ValueError on a size mismatch or a filter byte above 4.");

static PyObject *unfilter_into(PyObject *self, PyObject *args) {
    Py_buffer raw, out;
    Py_ssize_t h, w, bad;
    int bad_filter = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*nn:unfilter_into", &raw, &out, &h, &w)) return NULL;
    if (h <= 0 || w <= 0 || h > PY_SSIZE_T_MAX / (w + 1) || raw.len != h * (w + 1) || out.len != h * w ||
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

static PyMethodDef methods[] = {
    {"unfilter_into", unfilter_into, METH_VARARGS, unfilter_into_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_png_unfilter", "PNG row filters undone for 8-bit grayscale images.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__png_unfilter(void) { return PyModule_Create(&module); }
