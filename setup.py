"""The build of the one compiled part; all metadata lives in setup.cfg.

``egressproxy._relay`` (``egressproxy/_relay.c``) relays spliced connections
outside the interpreter.  It is optional: without a C compiler or Python's
headers, or off Linux, the install goes on without it and the proxy uses its
pure-Python data path (``fast_path: auto`` logs why at start-up).
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class optional_build_ext(build_ext):
    """build_ext that reports a failed build of the relay instead of failing the install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all, a broken toolchain
            self._skipped(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self._skipped(e)

    @staticmethod
    def _skipped(error):
        print(
            f"WARNING: egressproxy._relay was not built ({error}); "
            "the proxy will use its pure-Python data path",
            file=sys.stderr,
        )


ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(Extension(
        "egressproxy._relay",
        sources=["egressproxy/_relay.c"],
        depends=["egressproxy/_relaytls.h"],  # its TLS side: no OpenSSL headers or library needed
        extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
        optional=True,
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": optional_build_ext})
