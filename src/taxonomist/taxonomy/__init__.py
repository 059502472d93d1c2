"""Taxonomy: names, ranks, lineages and taxonomic distances. Knows nothing of torch.

>>> from taxonomist.taxonomy import builtin_taxonomy, distance_matrix
>>> tax = builtin_taxonomy("fathomnet2025")
>>> float(distance_matrix(tax, "fathomnet2025", ["Sebastolobus"], ["Sebastes"])[0, 0])
2.0
"""
from taxonomist.taxonomy.core import RANKS, Level, Taxonomy, suggest
from taxonomist.taxonomy.distances import (FATHOMNET_MAX_DISTANCE, METRICS, default_metric, distance_matrix,
                                           fathomnet2025_distance, lca_distance)
from taxonomist.taxonomy.io import builtin_taxonomy, read_taxonomy, write_taxonomy

__all__ = [
    "RANKS", "Level", "Taxonomy", "suggest", "METRICS", "FATHOMNET_MAX_DISTANCE", "default_metric", "distance_matrix",
    "fathomnet2025_distance", "lca_distance", "builtin_taxonomy", "read_taxonomy", "write_taxonomy",
]
