"""One decision path for every command: `DecisionOptions` (the rule, its candidates and thresholds, the OOD
method, threshold and fallback, TTA — checked once, when made) and `answer`, which turns probabilities and OOD
scores into what `predict` writes, `serve` returns and `evaluate` scores.

Numpy only: running the model, its TTA views and the OOD scores that need it are `inference`'s.

>>> import numpy as np
>>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
>>> a = answer(np.array([[0.55, 0.45], [0.9, 0.1]]), tax, DecisionOptions("backoff", thresholds=0.7))
>>> a.names, a.confidence.round(2).tolist(), a.levels
(['Fish', 'Cod'], [1.0, 0.9], {'depth1': ['', 'Cod']})
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from taxonomist.config import DecideConfig
from taxonomist.decide._arrays import as_probs
from taxonomist.decide.candidates import candidate_nodes
from taxonomist.decide.ensemble import VIEW_MODES
from taxonomist.decide.fallback import AUTO_FALLBACK, ood_fallback, parse_fallback, resolve_fallback
from taxonomist.decide.heuristics import check_top_k
from taxonomist.decide.priors import (APPLIED, CONFLICT, DEFAULT_PRIOR_FLOOR, DEFAULT_PRIOR_STRENGTH, ContextPriors,
                                      PriorShift, check_floor, check_strength)
from taxonomist.decide.ood import (ENSEMBLE_OOD_METHOD, MODEL_OOD_METHODS, PREDICT_OOD_METHODS, check_tpr,
                                   resolve_ood_method)
from taxonomist.decide.rules import DECISIONS, decide, expected_distance, node_thresholds, threshold_value
from taxonomist.decide.tree_sums import answer_probability
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import METRICS, Taxonomy, default_metric, distance_matrix, suggest
from taxonomist.taxonomy.core import RANK_INDEX

#: `metric`: the model's own distance (what it was trained and is evaluated with), else the taxonomy's default.
AUTO_METRIC = "auto"
#: The most probable labels an answer record lists (`answer_records`: serve's answers, predict's jsonl).
TOP_SHOWN = 5
#: The rules that take one number as `thresholds` and no per-rank ones.
_ONE_NUMBER_RULES = ("selective", "rollup", "common-ancestor")


def parse_thresholds(text: str | float | Mapping | None) -> Mapping | float | None:
    """`--thresholds`: `species=0.6,genus=0.7` (or `depth2=0.6`) → a dict, `0.7` → one number for every node;
    a number or a mapping is returned as given, "" as None.

    >>> parse_thresholds("species=0.6,genus=0.65"), parse_thresholds("0.7")
    ({'species': 0.6, 'genus': 0.65}, 0.7)
    """
    if text is None or isinstance(text, (Mapping, float, int, np.floating, np.integer)):
        return text
    raw = str(text).strip()
    if not raw:
        return None
    if "=" not in raw:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--thresholds {raw!r}: expected RANK=P,… (e.g. species=0.6,genus=0.65) "
                              "or one number") from None
    out: dict[str, float] = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--thresholds {raw!r}: item {item.strip()!r} is not RANK=P")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--thresholds {raw!r}: {key.strip()}={value.strip()!r} is not a number") from None
    return out


@dataclass(frozen=True)
class DecisionOptions:
    """How probabilities become answers, checked when made: a wrong value is a `ConfigError`, one line naming the
    option as its command-line flag. `resolve(taxonomy)` checks what needs the model's taxonomy.

    Attributes:
        decision: a rule of `DECISIONS` (`--decision`).
        candidates: the nodes an answer may be (`--candidates`): None = the training labels for argmax and
            min-risk, every node for the others; "" = the training labels; `all`; `fathomnet2025`; a file; names.
        thresholds: backoff's per rank or depth (`{"species": 0.6}`, `depth2`), or one number (backoff,
            selective, rollup, common-ancestor); a `--thresholds` string is parsed. None: the rule's default
            (`decide.default_thresholds`, rollup 0.65, common-ancestor 0.78, selective 0.5).
        selective_threshold: the selective rule's P(answer) target (default: `thresholds`, else 0.5).
        top_k: rollup (5) and common-ancestor (15): how many of the most probable labels count.
        metric: the distance min-risk minimises and `expected_distance` measures: `auto` = the model's own
            (its card's), else the taxonomy's default; `fathomnet2025`; `lca`.
        ood: an OOD method of `PREDICT_OOD_METHODS` (`auto` = `AUTO_OOD_METHOD`), or None.
        ood_threshold, ood_tpr: an example is unknown when its score ≥ `ood_threshold`, else ≥ the threshold
            that keeps `ood_tpr` (default `DEFAULT_OOD_TPR`) of the known validation examples; one at most.
        ood_fallback: what an unknown's answer falls back to (every rule but argmax, whose answers are only
            flagged): a rank, `depthN`, a depth or a probability (`decide.ood_fallback`); `auto` = the order,
            or depth 1 for an unranked tree.
        tta, tta_mode: test-time augmentation (a spec such as `rot2+flip`, "default" — what True gives — or
            `View`s) and how the views merge (`VIEW_MODES`); `inference.tta` parses the spec and runs them.
        priors: context priors (`--priors`): a `context,taxon,weight` CSV or a `ContextPriors`, applied to each
            example's context as a prior shift before the rule (`decide.priors`); None: no priors.
        prior_strength, prior_floor: λ of the shift (1 = Bayes' rule, 0 = off) and the weight of a label a list
            does not name, as a share of the mean listed weight (`decide.priors`).

    >>> DecisionOptions("min-risk", candidates="all", ood="auto").ood
    'mahalanobis'
    >>> DecisionOptions("argmax", top_k=3)
    Traceback (most recent call last):
    ...
    taxonomist.errors.ConfigError: --top-k applies to --decision rollup and common-ancestor only
    """

    decision: str = "argmax"
    candidates: str | tuple[str, ...] | None = None
    thresholds: Mapping[Any, float] | float | None = None
    selective_threshold: float | None = None
    top_k: int | None = None
    metric: str = AUTO_METRIC
    ood: str | None = None
    ood_threshold: float | None = None
    ood_tpr: float | None = None
    ood_fallback: str | int | float = AUTO_FALLBACK
    tta: str | tuple | None = None
    tta_mode: str = "mean_probs"
    priors: str | Path | ContextPriors | None = None
    prior_strength: float = DEFAULT_PRIOR_STRENGTH
    prior_floor: float = DEFAULT_PRIOR_FLOOR
    #: the taxonomy `resolve` checked these options against (its hash); None before
    resolved_for: str | None = field(default=None, init=False, compare=False, repr=False)
    #: the priors resolved for that taxonomy and the model's label prior; None before, or without priors
    prior_shift: PriorShift | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        put = self._put
        if self.decision not in DECISIONS:
            raise ConfigError(f"--decision: unknown decision {self.decision!r}{suggest(str(self.decision), DECISIONS)}"
                              f"; choose one of {', '.join(DECISIONS)}")
        put("candidates", _candidates(self.candidates))
        put("thresholds", _thresholds(parse_thresholds(self.thresholds)))
        self._check_rule_options()
        if self.metric not in (AUTO_METRIC, *METRICS):
            raise ConfigError(f"metric {self.metric!r}: choose one of {AUTO_METRIC}, {', '.join(METRICS)}"
                              f"{suggest(str(self.metric), METRICS)}")
        put("ood", resolve_ood_method(self.ood or None))
        self._check_ood_options()
        put("ood_fallback", parse_fallback(self.ood_fallback))
        put("tta", _tta(self.tta))
        if self.tta_mode not in VIEW_MODES:
            raise ConfigError(f"--tta-mode {self.tta_mode!r}: TTA mode must be one of {', '.join(VIEW_MODES)}"
                              f"{suggest(str(self.tta_mode), VIEW_MODES)}")
        self._check_priors()

    def _put(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # frozen: each value is normalised once, here

    def _check_rule_options(self) -> None:
        rule, thr = self.decision, self.thresholds
        if self.top_k is not None:
            if rule not in ("rollup", "common-ancestor"):
                raise ConfigError("--top-k applies to --decision rollup and common-ancestor only")
            self._put("top_k", check_top_k(self.top_k, "--top-k"))
        if self.selective_threshold is not None:
            if rule != "selective":
                raise ConfigError("--selective-threshold applies to --decision selective only")
            self._put("selective_threshold", threshold_value("all", self.selective_threshold))
        if rule in _ONE_NUMBER_RULES and isinstance(thr, Mapping):
            how = "the selective rule takes one number (--selective-threshold P)" if rule == "selective" else \
                f"{rule} takes one number (--thresholds P)"
            raise ConfigError(f"--thresholds RANK=P applies to backoff; {how}")

    def _check_ood_options(self) -> None:
        if self.ood is not None and self.ood not in PREDICT_OOD_METHODS:
            raise ConfigError(f"--ood: unknown OOD method {self.ood!r}{suggest(str(self.ood), PREDICT_OOD_METHODS)}"
                              f"; choose one of {', '.join(PREDICT_OOD_METHODS)}")
        if self.ood_threshold is not None and self.ood_tpr is not None:
            raise ConfigError("--ood-threshold, --ood-tpr: give either an OOD threshold or an OOD TPR, not both")
        if (self.ood_threshold is not None or self.ood_tpr is not None) and not self.ood:
            raise ConfigError("--ood-threshold, --ood-tpr: an OOD threshold or TPR needs an OOD method (--ood METHOD)")
        if self.ood_threshold is not None:
            t = self.ood_threshold
            if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not math.isfinite(t):
                raise ConfigError(f"--ood-threshold must be a finite number, got {t!r}")
            self._put("ood_threshold", float(t))
        if self.ood_tpr is not None:
            self._put("ood_tpr", check_tpr(self.ood_tpr, "--ood-tpr: the OOD TPR"))
        if self.ood == ENSEMBLE_OOD_METHOD and self.ood_threshold is None:
            # members trained on different folds share no held-out rows to fit a threshold on
            raise ConfigError("--ood ensemble needs --ood-threshold T (no validation scores are stored for an "
                              "ensemble; `taxonomist evaluate RUN --ensemble OTHER…` reports ood.ensemble.threshold)")

    def _check_priors(self) -> None:
        strength, floor = check_strength(self.prior_strength), check_floor(self.prior_floor)
        self._put("prior_strength", strength)
        self._put("prior_floor", floor)
        if self.priors is None or self.priors == "":
            self._put("priors", None)
            if strength != DEFAULT_PRIOR_STRENGTH or floor != DEFAULT_PRIOR_FLOOR:
                raise ConfigError("--prior-strength, --prior-floor: they set how --priors applies; give --priors "
                                  "PRIORS.csv")
        elif isinstance(self.priors, (str, Path)):
            self._put("priors", ContextPriors.read(self.priors))   # read now: a bad file fails before any model
        elif not isinstance(self.priors, ContextPriors):
            raise ConfigError(f"--priors must be a CSV file or a ContextPriors, got {type(self.priors).__name__}")

    # ------------------------------------------------------------------------------------------ derived
    @classmethod
    def from_config(cls, config: DecideConfig, ranked: bool, **given) -> DecisionOptions:
        """The options of a run's `decide` config, with the `given` ones that are not None in place of its values.

        Backoff without given thresholds takes the config's per-rank ladder on a ranked taxonomy (an unranked
        tree keeps the per-depth defaults); "" or no candidates mean the rule's default set.

        >>> DecisionOptions.from_config(DecideConfig(), ranked=True, decision="backoff").thresholds["species"]
        0.55
        """
        given = {k: v for k, v in given.items() if v is not None}
        decision = given.pop("decision", None) or config.decision or "argmax"
        spec = given.pop("candidates", config.candidates)
        thresholds = given.pop("thresholds", None)
        if thresholds is None and decision == "backoff" and ranked:
            thresholds = dict(config.thresholds)
        return cls(decision, candidates=spec or None, thresholds=thresholds, metric=config.metric, **given)

    def replace(self, **changes) -> DecisionOptions:
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)

    @property
    def rule_thresholds(self) -> Mapping | float | None:
        """The `thresholds` argument of `decide.decide` for the rule (selective: its one target, default 0.5)."""
        if self.decision == "selective":
            if self.selective_threshold is not None:
                return self.selective_threshold
            return 0.5 if self.thresholds is None else self.thresholds
        return self.thresholds

    @property
    def needs_torch(self) -> str | None:
        """The option that needs the PyTorch model (ODIN's input gradients, MC-dropout's dropout), if any."""
        return f"--ood {self.ood}" if self.ood in MODEL_OOD_METHODS else None

    def resolve(self, taxonomy: Taxonomy, model_metric: str | None = None,
                label_prior: Sequence[float] | None = None) -> DecisionOptions:
        """These options made concrete for a model: the candidate names (None kept: the rule's default set), the
        thresholds checked against the taxonomy, the `auto` metric, (with `ood`) the fallback decided and (with
        `priors`) the priors resolved (`prior_shift`). `model_metric` is the distance the model was trained with
        (its card's), used for `metric: auto`; `label_prior` the label frequencies it learned (its card's
        `label_prior`; None: uniform), which the prior shift divides out. Resolving again is cheap."""
        if self.resolved_for == taxonomy.hash and model_metric in (None, self.metric) and label_prior is None:
            return self
        metric = self.metric if self.metric != AUTO_METRIC else (model_metric or AUTO_METRIC)
        if metric == AUTO_METRIC:
            metric = default_metric(taxonomy)
        candidates = None if self.candidates is None else tuple(candidate_nodes(taxonomy, _spec(self.candidates)))
        thr = self.rule_thresholds
        if self.decision == "backoff" or (self.decision in _ONE_NUMBER_RULES and thr is not None):
            node_thresholds(taxonomy, thr)  # rank or depth keys, numbers in [0, 1]
        # the fallback matters (and is checked against the taxonomy) only when unknowns are flagged
        fallback = resolve_fallback(self.ood_fallback, taxonomy) if self.ood else self.ood_fallback
        out = dataclasses.replace(self, candidates=candidates, metric=metric, ood_fallback=fallback)
        out._put("resolved_for", taxonomy.hash)
        if self.priors is not None:
            # keep the shift (and the label prior) a first resolve for this taxonomy made
            keep = label_prior is None and self.prior_shift is not None and self.resolved_for == taxonomy.hash
            out._put("prior_shift", self.prior_shift if keep else
                     self.priors.resolve(taxonomy, label_prior, self.prior_strength, self.prior_floor))
        return out

    def describe(self) -> dict[str, Any]:
        """The options as plain values (JSON-ready): what a part file's key and `/health` show."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "resolved_for"}
        out["candidates"] = None if self.candidates is None else (
            self.candidates if isinstance(self.candidates, str) else list(self.candidates))
        out["tta"] = self.tta if self.tta is None or isinstance(self.tta, str) else [v.name for v in self.tta]
        out["priors"] = None if self.priors is None else self.priors.source
        return out


def _spec(candidates):
    return list(candidates) if isinstance(candidates, tuple) else candidates


def _candidates(value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return tuple(str(n) for n in value)
    raise ConfigError(f"--candidates must be '', 'all', 'fathomnet2025', a file or a list of names, "
                      f"got {type(value).__name__}")


def _thresholds(value):
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {key: threshold_value(key, v) for key, v in value.items()}
    return threshold_value("all", value)


def _tta(value):
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str):
        return value.strip() or "default"
    if isinstance(value, (list, tuple)) and value:
        return tuple(value)
    raise ConfigError("--tta: give a spec such as 'rot2+flip' (or True for the default views)")


# ---------------------------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class Answers:
    """One answer per example, as `answer` gives them.

    Attributes:
        nodes: (N,) answers, indices into `taxonomy.names` (after the OOD fallback).
        names: the answered node names.
        confidence: (N,) P(answer): the summed probability of the labels at or below it.
        levels: per rank (or per depth, `depthN`, for an unranked tree): the answer's ancestor-or-self there,
            "" where its lineage has none.
        level_probabilities: per level: the probability of that ancestor, NaN where there is none.
        expected_distance: (N,) the answer's expected distance under the probabilities (in the options' metric).
        decided: (N,) the rule's answers before the OOD fallback.
        ood_score, unknown: (N,) the OOD scores given and whether each reaches the threshold; None without.
        probs: (N, L) the probabilities the rule decided on (after the context priors, when given).
        raw_nodes, raw_names: (N,) with priors, the answers the same rule and OOD fallback give without them;
            else None.
        raw_probs: (N, L) with priors, the probabilities before them; else None.
        prior_applied: (N,) with priors, True where the example's context shifted its probabilities; else None.
        prior_conflict: (N,) with priors, True where its context's keys block every label together (unchanged).
    """

    nodes: np.ndarray
    names: list[str]
    confidence: np.ndarray
    levels: dict[str, list[str]]
    level_probabilities: dict[str, np.ndarray]
    expected_distance: np.ndarray
    decided: np.ndarray
    ood_score: np.ndarray | None = None
    unknown: np.ndarray | None = None
    probs: np.ndarray | None = None
    raw_nodes: np.ndarray | None = None
    raw_names: list[str] | None = None
    raw_probs: np.ndarray | None = None
    prior_applied: np.ndarray | None = None
    prior_conflict: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.nodes)


def answer(probs: np.ndarray, taxonomy: Taxonomy, options: DecisionOptions,
           ood_scores: np.ndarray | None = None, ood_threshold: float | None = None,
           contexts: Sequence | None = None) -> Answers:
    """The answers of `options.decision` for (N, L) probabilities over `taxonomy.labels` (calibrated: after the
    model's temperature, TTA and the ensemble's combination).

    With `ood_scores` (N,) an example is unknown when its score ≥ `ood_threshold` (default
    `options.ood_threshold`: give the threshold in use, e.g. the stored one that keeps `options.ood_tpr` of the
    known validation examples); an unknown's answer falls back to a coarse ancestor (`options.ood_fallback`)
    unless the rule is argmax. With `options.priors`, each example's context (`contexts`, one per row: keys
    joined by `;`; None or "" for none) shifts its probabilities before the rule (`decide.priors`), and the
    answers without the priors are kept beside (`raw_nodes`). `options` are resolved for `taxonomy` first when
    they are not yet (give `resolve(…, label_prior=…)` the model's label prior first; else it is uniform).
    """
    opts = options.resolve(taxonomy)
    p = as_probs(probs, n_cols=len(taxonomy.labels))
    score = unknown = None
    if ood_scores is not None:
        score = np.asarray(ood_scores)
        if score.shape != (len(p),):
            raise DataError(f"ood_scores must have one score per row of probs ({len(p)}), got shape {score.shape}")
        threshold = opts.ood_threshold if ood_threshold is None else ood_threshold
        if threshold is None:
            raise ConfigError("OOD scores need a threshold: give ood_threshold (the one in use) or "
                              "DecisionOptions(ood_threshold=T)")
        unknown = np.asarray(score >= threshold, dtype=bool)  # compared at the scores' own precision
        score = score.astype(np.float64)
    raw_nodes = raw_probs = applied = conflict = None
    if opts.prior_shift is not None:
        contexts = [None] * len(p) if contexts is None else list(contexts)
        shifted, status = opts.prior_shift.apply(p, contexts)
        applied, conflict = status == APPLIED, status == CONFLICT
        raw_decided = _decide(p, taxonomy, opts)
        raw_nodes = _fall_back(raw_decided, unknown, p, taxonomy, opts)
        raw_probs, p = p, shifted
    decided = _decide(p, taxonomy, opts)
    nodes = _fall_back(decided, unknown, p, taxonomy, opts)
    level_nodes = answer_levels(taxonomy, nodes)
    blank = np.array([*taxonomy.names, ""], dtype=object)  # index -1 → ""
    levels = {name: blank[idx].tolist() for name, idx in level_nodes.items()}
    level_p = {}
    for name, idx in level_nodes.items():
        has = idx >= 0
        values = np.full(len(idx), np.nan)
        if has.any():
            values[has] = answer_probability(p[has], taxonomy, idx[has])
        level_p[name] = values
    answered = np.unique(nodes)
    dist = distance_matrix(taxonomy, opts.metric, rows=taxonomy.labels, cols=[taxonomy.names[n] for n in answered])
    return Answers(nodes, [taxonomy.names[n] for n in nodes], answer_probability(p, taxonomy, nodes), levels,
                   level_p, expected_distance(p, dist, np.searchsorted(answered, nodes)), decided, score, unknown,
                   p, raw_nodes, None if raw_nodes is None else [taxonomy.names[n] for n in raw_nodes], raw_probs,
                   applied, conflict)


def _decide(p: np.ndarray, taxonomy: Taxonomy, opts: DecisionOptions) -> np.ndarray:
    candidates = None if opts.candidates is None else list(opts.candidates)
    return decide(p, taxonomy, opts.decision, candidates=candidates, metric=opts.metric,
                  thresholds=opts.rule_thresholds, top_k=opts.top_k).nodes


def _fall_back(decided: np.ndarray, unknown: np.ndarray | None, p: np.ndarray, taxonomy: Taxonomy,
               opts: DecisionOptions) -> np.ndarray:
    """The rule's answers with the unknowns' moved to their OOD fallback (argmax answers are only flagged)."""
    if unknown is None or opts.decision == "argmax" or not unknown.any():
        return decided
    candidates = None if opts.candidates is None else list(opts.candidates)
    return ood_fallback(decided, unknown, taxonomy, opts.ood_fallback, probs=p, candidates=candidates)


def answer_records(answers: Answers, taxonomy: Taxonomy, options: DecisionOptions, top_k: int = TOP_SHOWN,
                   ood_method: str | None = None, ood_threshold: float | None = None,
                   contexts: Sequence | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per example: what `serve` answers for an image and `predict --format jsonl` writes
    per line. Keys: `decision` (the answer), `confidence` (P(answer)), `rank` (None for an unranked tree),
    `lineage` (per rank or depth: the ancestor's name and probability), `top` (the `top_k` most probable labels),
    `rule` (the decision rule, its metric, and whether the OOD fallback replaced the rule's answer); with OOD
    scores `ood` (score, unknown, method, threshold); with priors `priors` (the example's context, whether the
    priors applied, whether its keys conflicted) and `raw` (the answer, its confidence and the top labels without
    them). Probabilities are rounded to 6 decimals; OOD scores
    are not (ODIN's differ in the 7th).

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> opts = DecisionOptions("argmax")
    >>> answer_records(answer(np.array([[0.7, 0.3]]), tax, opts), tax, opts, top_k=1)[0]["top"]
    [{'name': 'Cod', 'p': 0.7}]
    """
    opts = options.resolve(taxonomy)
    probs = answers.probs
    labels = taxonomy.labels
    k = min(int(top_k), len(labels))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    raw_top = None if answers.raw_probs is None else np.argsort(-answers.raw_probs, axis=1, kind="stable")[:, :k]
    raw_conf = None if answers.raw_nodes is None else answer_probability(answers.raw_probs, taxonomy, answers.raw_nodes)
    out = []
    for i, name in enumerate(answers.names):
        lineage = {level: {"name": names[i], "p": round(float(answers.level_probabilities[level][i]), 6)}
                   for level, names in answers.levels.items() if names[i]}
        record: dict[str, Any] = {
            "decision": name, "confidence": round(float(answers.confidence[i]), 6),
            "rank": taxonomy.rank(name) if taxonomy.has_ranks else None, "lineage": lineage,
            "top": [{"name": labels[j], "p": round(float(probs[i, j]), 6)} for j in top[i].tolist()]}
        if answers.ood_score is not None:
            record["ood"] = {"score": float(answers.ood_score[i]), "unknown": bool(answers.unknown[i]),
                             "method": ood_method or opts.ood, "threshold": None if ood_threshold is None
                             else float(ood_threshold)}
        record["rule"] = {"decision": opts.decision, "metric": opts.metric,
                          "ood_fallback": bool(answers.nodes[i] != answers.decided[i])}
        if answers.raw_nodes is not None:
            context = None if contexts is None else contexts[i]
            record["priors"] = {"context": None if context is None or context != context else str(context),  # NaN
                                "applied": bool(answers.prior_applied[i]),
                                "conflict": bool(answers.prior_conflict[i])}
            record["raw"] = {"decision": answers.raw_names[i], "confidence": round(float(raw_conf[i]), 6),
                             "top": [{"name": labels[j], "p": round(float(answers.raw_probs[i, j]), 6)}
                                     for j in raw_top[i].tolist()]}
        out.append(record)
    return out


def answer_levels(taxonomy: Taxonomy, nodes: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Per rank (or per depth for an unranked tree): each answer's ancestor-or-self there as an index into
    `taxonomy.names`, -1 where its lineage has none.

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> {k: v.tolist() for k, v in answer_levels(tax, tax.indices(["Fish", "Cod"])).items()}
    {'depth1': [-1, 1]}
    """
    nodes = np.asarray(nodes, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    if taxonomy.has_ranks:
        codes = taxonomy.rank_codes()[nodes]
        for level in taxonomy.levels():
            out[level.name] = codes[:, RANK_INDEX[level.name]]
    else:
        anc = taxonomy.ancestor_table()[nodes]
        for level in taxonomy.levels():
            out[level.name] = anc[:, int(level.name.removeprefix("depth"))]
    return out


__all__ = ["DecisionOptions", "Answers", "answer", "answer_levels", "answer_records", "parse_thresholds", "AUTO_METRIC",
           "TOP_SHOWN"]
