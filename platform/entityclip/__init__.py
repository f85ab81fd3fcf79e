"""EntityCLIP Platform: entity-centric image-text matching on Ray."""

__version__ = "0.1.0"
