"""moshi-patch: Moshi's LMGen with the logits of each streaming step, and a long-context audio eval."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _version() -> str:
    # Single source for the version: moshi_patch/__init__.py.
    for line in (ROOT / "moshi_patch" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("__version__ not found in moshi_patch/__init__.py")


# The dependencies, as literals: .ci/run keys its cached environment on them (not on the rest of this file).
INSTALL_REQUIRES = [
    # moshi_patch: 0.2.9 to 0.2.13, moshi_eval: 0.2.12 to 0.2.13 (tests/helpers/moshi_matrix.py, moshi_patch/compat.py)
    "moshi>=0.2.9,<=0.2.13",
    "torch>=2.2,<2.10",
    "numpy",
    "einops",
    "sentencepiece",
    "sphn",
    "safetensors",
    "tqdm",
    "matplotlib",
]
EXTRAS_REQUIRE = {
    # Loggers for `moshi-eval ... --wandb / --tensorboard` and `moshi_eval.loggers`.
    "wandb": ["wandb"],
    "tensorboard": ["tensorboard"],
    # flake8: upstream's linter, for the upstream PR tests; the loggers, to test them offline.
    "test": ["pytest", "flake8", "wandb", "tensorboard"],
}


setup(
    name="moshi-patch",
    version=_version(),
    description="Moshi LMGen.step_with_logits (streaming logits under KV cache and TTT state) "
    "and a long-context LibriLight audio cross-entropy eval.",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moshi_patch", "moshi_patch.*", "moshi_eval", "moshi_eval.*"]),
    package_data={"moshi_eval": ["assets/*"], "moshi_patch": ["pr_tests/*.py"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["moshi-eval = moshi_eval.cli:main"]},
)
