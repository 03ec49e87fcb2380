"""Data: texts and labels from any source, as checked train/validation/test splits."""
from peftlab.data.sources import LoadedData, TextSplit, load_data
from peftlab.data.splits import carve, subsample

__all__ = ["LoadedData", "TextSplit", "load_data", "carve", "subsample"]
