"""Typed, validated configuration (schema.py) and its loading (load.py)."""
from peftlab.config.load import config_tree, load_config, save_config
from peftlab.config.schema import Config

__all__ = ["Config", "config_tree", "load_config", "save_config"]
