"""Build glue for the parts pyproject.toml cannot declare: the cffi extension."""
from setuptools import setup

setup(cffi_modules=["jupyter_contain/native/build.py:ffibuilder"])
