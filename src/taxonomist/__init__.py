"""taxonomist: hierarchical image classification of organisms, scored by taxonomic distance."""
__version__ = "0.1.0"
