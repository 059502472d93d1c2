"""taxonomist: hierarchical image classification of organisms, scored by taxonomic distance.

The Python API — what the `taxonomist` command calls — imported on first use, so that `import taxonomist` (and
`taxonomist --help`) stays free of torch:

    fit(config)                 train → calibrate → evaluate → report, as `taxonomist train` runs it
    load_config(file, overrides), Config    the typed config, from YAML and `key=value` overrides
    load_model(path)            a checkpoint, run directory or `.onnx` file → (model, card, taxonomy)
    predict(models, images, out)            `taxonomist predict`
    evaluate(model, data=…)     `taxonomist evaluate` (the `evaluate` package, callable)
    decide                      the decision rules on numpy probabilities (`decide.decide`, `min_risk_decision`, …)
    Taxonomy                    labels, lineages and taxonomic distances

>>> import taxonomist                                                                           # doctest: +SKIP
>>> cfg = taxonomist.load_config(None, ["data.root=data/synth", "out=runs/first"])             # doctest: +SKIP
>>> result = taxonomist.fit(cfg); result.raise_for_failure()                                   # doctest: +SKIP
>>> result.evaluation.metrics["mhd"]                                                           # doctest: +SKIP

docs/architecture.md says which module does what.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name → the module that defines it
_API = {
    "fit": "taxonomist.pipeline",
    "Config": "taxonomist.config",
    "load_config": "taxonomist.config",
    "load_model": "taxonomist.inference.model_file",
    "predict": "taxonomist.inference.predict",
    "Taxonomy": "taxonomist.taxonomy",
}
#: public names that are packages of their own: `evaluate` is callable (`evaluate.run.evaluate_run`)
_PACKAGES = ("evaluate", "decide")

__all__ = ["__version__", *_API, *_PACKAGES]

if TYPE_CHECKING:  # for type checkers and editors; at run time `__getattr__` imports on first use
    from taxonomist import decide, evaluate
    from taxonomist.config import Config, load_config
    from taxonomist.inference.model_file import load_model
    from taxonomist.inference.predict import predict
    from taxonomist.pipeline import fit
    from taxonomist.taxonomy import Taxonomy


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in _PACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
