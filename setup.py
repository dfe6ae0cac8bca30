"""pivot: training and analysis stack for "RL makes MLLMs see better than SFT" (arXiv 2510.16333)."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name: str) -> list[str]:
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _known_to_work(requirement: str) -> str:
    """An exact pin `pkg==A.B.C` becomes the range `pkg>=A.B.C,<A.(B+1)` for users' own environments.

    The Makefile and CI install requirements.lock exactly; a user's cluster environment (a CUDA torch
    2.13.x, a newer patch release of transformers) only needs versions of the same minor release.
    """
    name, sep, version = requirement.partition("==")
    if not sep:
        return requirement
    major, minor = version.split(".")[:2]
    return f"{name}>={version},<{major}.{int(minor) + 1}"


setup(
    name="pivot",
    version="0.1.0",
    description="LLaVA-OneVision-style MLLM training (SFT vs DPO on matched samples) and vision-encoder analysis",
    python_requires=">=3.10",
    packages=find_packages(include=["llava", "llava.*", "analysis", "analysis.*", "patches", "patches.*"]),
    install_requires=[_known_to_work(r) for r in _requirements("requirements.txt")],
    extras_require={
        # flash-attn needs CUDA to build; deepspeed installs and imports on CPU too. bitsandbytes quantizes the
        # LLM for QLoRA (--bits 4|8, refused without CUDA); the CPU lock leaves it out (tests/test_lock.py).
        "gpu": ["deepspeed==0.19.8", "flash-attn", "bitsandbytes==0.50.2"],
        # Install on CPU with a constraint pinning torch==2.13.0, then remove torchvision (see Makefile).
        "eval": [_known_to_work(r) for r in _requirements("requirements-eval.txt")],
        "dev": [_known_to_work(r) for r in _requirements("requirements-dev.txt")],
    },
    entry_points={
        "console_scripts": ["pivot-export=llava.export:main"],
        # lmms-eval 0.7 finds models outside its package only through this group (`--model pivot`).
        "lmms_eval.models": ["pivot = llava.eval:lmms_eval_manifest"],
    },
)
