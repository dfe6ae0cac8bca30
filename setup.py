"""pivot: training and analysis stack for "RL makes MLLMs see better than SFT" (arXiv 2510.16333)."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name: str) -> list[str]:
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="pivot",
    version="0.1.0",
    description="LLaVA-OneVision-style MLLM training (SFT vs DPO on matched samples) and vision-encoder analysis",
    python_requires=">=3.10",
    packages=find_packages(include=["llava", "llava.*", "analysis", "analysis.*", "patches", "patches.*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={
        # flash-attn needs CUDA to build; deepspeed installs and imports on CPU too.
        "gpu": ["deepspeed==0.19.8", "flash-attn"],
        # Install on CPU with a constraint pinning torch==2.13.0, then remove torchvision (see Makefile).
        "eval": _requirements("requirements-eval.txt"),
        "dev": _requirements("requirements-dev.txt"),
    },
    entry_points={
        "console_scripts": ["pivot-export=llava.export:main"],
        # lmms-eval 0.7 finds models outside its package only through this group (`--model pivot`).
        "lmms_eval.models": ["pivot = llava.eval:lmms_eval_manifest"],
    },
)
