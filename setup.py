"""Build the C extension `userfault._native` (thin syscall/ioctl layer and the fault engine)."""

from glob import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "userfault._native",
            sources=sorted(glob("src/userfault/_native/*.c")),
            depends=sorted(glob("src/userfault/_native/*.h")),
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            libraries=["pthread"],
        )
    ]
)
