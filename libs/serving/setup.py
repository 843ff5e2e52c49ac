"""The one compiled part of cxr-serving (metadata is in pyproject.toml): PNG row filters undone in C for
`cxr_serving.png_gray8`. Optional: without a C compiler the package installs, and 8-bit grayscale PNGs
decode with OpenCV as before."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cxr_serving._png_unfilter",
            sources=["src/cxr_serving/_png_unfilter.c"],
            optional=True,
        )
    ]
)
