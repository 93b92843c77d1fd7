from pathlib import Path

from setuptools import setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="restpg",
    version="0.1.0",
    description="REST-PG: reasoning-enhanced EM self-training for personalized long-form text generation, on Spark + Delta + MLflow",
    python_requires=">=3.11,<3.12",
    package_dir={"": "lib", "restpg.schemas": "schemas"},
    packages=["restpg", "restpg.schemas"],
    package_data={"restpg": ["profiles/*.yaml", "templates/*.txt"], "restpg.schemas": ["*.json"]},
    install_requires=requirements,
    extras_require={"dev": ["pytest>=8"], "test": ["pytest>=8"]},
    entry_points={"console_scripts": ["restpg=restpg.cli:main"]},
)
