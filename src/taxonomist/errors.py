"""One exception hierarchy for every mistake a user can make.

The CLI catches `TaxonomistError` and prints `error: <message>` on one line; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations


class TaxonomistError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""

    #: the command line's exit status for this error
    exit_code = 2


class TaxonomyError(TaxonomistError):
    """A taxonomy table is malformed (duplicate names, a node with two parents, a cycle, …)."""


class UnknownLabelError(TaxonomistError):
    """A name is not a node of the taxonomy; the message carries a "did you mean" suggestion."""


class DataError(TaxonomistError):
    """A dataset, CSV, COCO file or image is missing or malformed."""


class ConfigError(TaxonomistError):
    """A configuration key or value is invalid."""


class SubmissionError(TaxonomistError):
    """A submission or solution CSV does not follow the expected format."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ModelError(TaxonomistError):
    """A backbone, checkpoint or pretrained-weights source cannot be used."""


class DownloadError(TaxonomistError):
    """Files could not be fetched."""


class PostTrainingError(TaxonomistError):
    """Training finished and its model is saved, but a step after it (calibrate, evaluate, report) failed.

    Exit status 3, distinct from a failed training (2) and from a bug (1). `redo` is the command that redoes the
    step; the traceback is in `log` (RUN/errors.log)."""

    exit_code = 3

    def __init__(self, message: str, step: str, redo: str, log=None):
        super().__init__(message)
        self.step, self.redo, self.log = step, redo, log
