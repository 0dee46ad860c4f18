"""Builds the optional compiled fast path of the TCP relay (userproxy/dataplane/_relay.c).

Everything else is in pyproject.toml.  ``optional=True``: on a machine without a C
compiler the build of the extension fails quietly and userproxy installs without it,
running the pure-Python relay (tcp_relay.py), which stays the reference.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "userproxy.dataplane._relay",
            sources=["userproxy/dataplane/_relay.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
        )
    ]
)
