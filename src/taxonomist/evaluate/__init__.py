"""Evaluation: metrics on numpy arrays (no torch), Kaggle-style scoring of submission files, and the evaluation of
a model on a dataset (`evaluate.run.evaluate_run`, what `taxonomist evaluate` runs).

The package is callable: `taxonomist.evaluate(model, data=…)` is `evaluate_run(model, data=…)`. The public API's
`evaluate` and this package share the name `taxonomist.evaluate`, and importing any module of the package binds
that name to the package, so the package itself answers the call.
"""
import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        """`evaluate.run.evaluate_run(*args, **kwargs)`."""
        from taxonomist.evaluate.run import evaluate_run

        return evaluate_run(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
