from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

PRESET_PACKAGES = ["reward_forcing.presets"] + [
    "reward_forcing.presets." + folder.name for folder in sorted(Path(__file__).with_name("configs").iterdir())
    if folder.is_dir()
]

setup(
    name="reward-forcing",
    version="0.1.0",
    license="Apache-2.0",
    description="Reward Forcing: streaming causal text-to-video generation with EMA-Sink and Re-DMD",
    # configs/ (the presets users pass as --config_path configs/NAME.yaml) is also installed as the data package
    # reward_forcing.presets, so that an installed package finds them by name (reward_forcing/config.py).
    packages=[*find_packages(include=["reward_forcing", "reward_forcing.*"]), *PRESET_PACKAGES],
    package_dir={"reward_forcing.presets": "configs"},
    package_data={"reward_forcing": ["defaults/*.yaml", "serve/static/*"],
                  **{package: ["*.yaml"] for package in PRESET_PACKAGES}},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "miniworld": ["matplotlib>=3.7"],  # scripts/miniworld.py's plots
        # the suite runs scripts/miniworld.py --quick; tests/test_serve.py also needs Debian chromium + chromium-driver
        "test": ["pytest>=7", "peft>=0.13", "matplotlib>=3.7", "httpx>=0.27", "selenium>=4.20"],
    },
)
