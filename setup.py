"""Packaging for the I-FAS trainer (distribution `ifas`)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    reqs = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    # torch is installed by the Makefile (CPU wheel) or by the user (CUDA build): accept any
    # release from the tested one on, so a CUDA torch on a GPU machine is never replaced.
    return ["torch>=2.13.0"] + reqs


setup(
    name="ifas",
    version="0.1.0",
    description="Interpretable Face Anti-Spoofing (I-FAS): DeepSpeed ZeRO-3 trainer for a multimodal LLM",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["trainer", "trainer.*", "kernels", "kernels.*", "shards", "shards.*"]),
    package_data={"shards": ["data/*"]},
    install_requires=_requirements(),
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
    },
    entry_points={
        "console_scripts": [
            "ifas-train=trainer.cli.train:main",
            "ifas-shards=shards.cli:main",
            "ifas-eval=trainer.cli.eval:main",
            "ifas-predict=trainer.cli.predict:main",
            "ifas-export=trainer.cli.export:main",
            "ifas-ablation=trainer.cli.ablation:main",
        ]
    },
)
