"""restpg: REST-PG personalized text generation as Spark + Delta + MLflow batch stages."""
__version__ = "0.1.0"
