"""Packaging: the Python package ``adtuning`` plus the Triton kernels in ``kernels/``
(installed as ``adtuning.kernels``) and the C++ sources in ``csrc/`` (shipped as package
data and compiled on first use by ``adtuning.native``; nothing is compiled at install time)."""
from setuptools import find_packages, setup

packages = find_packages(include=["adtuning", "adtuning.*"]) + ["adtuning.kernels", "adtuning.csrc"]

setup(
    packages=packages,
    package_dir={"adtuning.kernels": "kernels", "adtuning.csrc": "csrc"},
    package_data={
        "adtuning.csrc": ["*.cpp", "*.h"],
        # the shipped pre-trained upstream and the pre-training vocabulary
        "adtuning.speech": ["assets/*.txt", "assets/*/*.json", "assets/*/*.safetensors"],
    },
    include_package_data=True,
)
