"""dalle2-jax: train DALL-E 2 (unCLIP) stage by stage in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "array_record>=0.8.6",
    "ml-collections>=1.1.0",
    "tensorboardX>=2.6.5",
    "tokenizers>=0.23",
    "ftfy>=6.1",  # CLIP's text cleaning (its BPE tokenizer)
    "regex>=2023.0",  # CLIP's pre-tokenisation pattern (\p{L}, \p{N})
    "safetensors>=0.4",  # reading released CLIP weights without torch
    "pillow>=11",
    "numpy>=2.0",
    "absl-py>=2.0",
    "etils[epath]>=1.10",
    "clu>=0.0.12",
    "importlib_resources",  # tensorflow-datasets needs it to prepare builders but does not declare it
]

setup(
    name="dalle2-jax",
    version="0.1.0",
    description="DALL-E 2 (unCLIP) training framework in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dalle2_jax", "dalle2_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    package_data={"dalle2_jax": ["assets/*"]},  # CLIP's BPE merges and their MIT notice
    extras_require={
        # gs:// paths: gcsfs is etils.epath's fsspec backend; orbax's arrays (tensorstore) and grain's reads
        # (array_record) use their own GCS clients.
        "gcs": ["gcsfs>=2024.2"],
        # the remote-path tests run every GCS client against a local emulator (tests/fake_gcs.py)
        # filelock: the test session's shared fixtures are built once for all xdist workers (tests/conftest.py)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "filelock>=3.12", "ruff>=0.6", "gcsfs>=2024.2",
                 "gcp-storage-emulator>=2024.8"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
    },
    entry_points={"console_scripts": ["dalle2-jax=dalle2_jax.cli:main"]},
)
