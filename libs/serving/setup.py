"""The one compiled part of cxr-serving (metadata is in pyproject.toml): `cxr_serving._pixels`, the PNG row
filters of `cxr_serving.png_gray8` and the one-pass preprocessing of uint8 and float32 images (`cxr_serving.resize`,
both image services), in C. Optional:
without a C compiler the package installs, PNGs decode with OpenCV and preprocessing takes the tensor path."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cxr_serving._pixels",
            sources=["src/cxr_serving/_pixels.c"],
            optional=True,
        )
    ]
)
