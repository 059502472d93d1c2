"""Shared fixtures for the model tests: one thread (the CI box has two cores) and a tiny ranked taxonomy."""
import pytest
import torch

from taxonomist.taxonomy import Taxonomy

torch.set_num_threads(1)


@pytest.fixture
def ranked_taxonomy() -> Taxonomy:
    """Two phyla, a genus-level label (Actinia) beside two species: levels kingdom 1, phylum 2, genus 2, species 2."""
    parent_of = {"Animalia": None, "Chordata": "Animalia", "Cnidaria": "Animalia", "Sebastes": "Chordata",
                 "Sebastes alutus": "Sebastes", "Sebastes diploproa": "Sebastes", "Actinia": "Cnidaria"}
    ranks = {"Animalia": "kingdom", "Chordata": "phylum", "Cnidaria": "phylum", "Sebastes": "genus",
             "Sebastes alutus": "species", "Sebastes diploproa": "species", "Actinia": "genus"}
    return Taxonomy.from_parents(parent_of, labels=["Sebastes alutus", "Sebastes diploproa", "Actinia"], ranks=ranks)
