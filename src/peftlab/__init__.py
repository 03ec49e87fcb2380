"""peftlab: fine-tune transformer text classifiers with parameter-efficient methods, measured."""

__version__ = "0.1.0"
