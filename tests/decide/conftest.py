"""Two hand-made trees for the decision tests: an unranked 2×2 tree and a small ranked marine lineage."""
from __future__ import annotations

import pytest

from taxonomist.taxonomy import Taxonomy


@pytest.fixture
def tree() -> Taxonomy:
    """R → {A → {a1, a2}, B → {b1, b2}}; labels a1, a2, b1, b2; lca distance 2 between siblings, 4 across."""
    return Taxonomy.from_parents({"R": None, "A": "R", "B": "R", "a1": "A", "a2": "A", "b1": "B", "b2": "B"})


@pytest.fixture
def ranked() -> Taxonomy:
    """Animalia > Chordata > {Tunicata (no rank, a label), Actinopterygii > Scorpaeniformes > Sebastidae >
    {Sebastes > {S. alpha, S. beta}, Sebastolobus (a genus-level label)}}."""
    parents = {"Animalia": None, "Chordata": "Animalia", "Tunicata": "Chordata", "Actinopterygii": "Chordata",
               "Scorpaeniformes": "Actinopterygii", "Sebastidae": "Scorpaeniformes", "Sebastes": "Sebastidae",
               "Sebastes alpha": "Sebastes", "Sebastes beta": "Sebastes", "Sebastolobus": "Sebastidae"}
    ranks = {"Animalia": "kingdom", "Chordata": "phylum", "Actinopterygii": "class", "Scorpaeniformes": "order",
             "Sebastidae": "family", "Sebastes": "genus", "Sebastolobus": "genus",
             "Sebastes alpha": "species", "Sebastes beta": "species"}
    return Taxonomy.from_parents(parents, labels=["Tunicata", "Sebastes alpha", "Sebastes beta", "Sebastolobus"],
                                 ranks=ranks)
