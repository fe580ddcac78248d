from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="reward-forcing",
    version="0.1.0",
    description="Reward Forcing: streaming causal text-to-video generation with EMA-Sink and Re-DMD",
    packages=find_packages(include=["reward_forcing", "reward_forcing.*"]),
    package_data={"reward_forcing": ["defaults/*.yaml", "serve/static/*"]},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "miniworld": ["matplotlib>=3.7"],  # scripts/miniworld.py's plots
        # the suite runs scripts/miniworld.py --quick; tests/test_serve.py also needs Debian chromium + chromium-driver
        "test": ["pytest>=7", "peft>=0.13", "matplotlib>=3.7", "httpx>=0.27", "selenium>=4.20"],
    },
)
