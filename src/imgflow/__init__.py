"""imgflow: the universal workflow of machine learning for image classification."""

__version__ = "0.1.0"
