"""raysd: Ray-based distributed hyperparameter search for unsupervised anomalous sound detection."""

__version__ = "0.1.0"
