"""Classifier heads on frozen features, as scikit-learn estimators.

`make_head` builds the full pipeline: the reduction (`make_reduction`: L2 normalisation,
standardisation, a PCA to at most `dims` components; the features of a head are redundant: 2,660
columns of the three-part set carry what a few hundred components do, and every fit then costs a
fraction), then the classifier:

- `whitened_logistic`: the components whitened (`ShrunkWhitening`), then scikit-learn's
  multinomial, class-balanced `LogisticRegression` (lbfgs converges in a tenth of the
  iterations there);
- `MLPHead`, a soft vote of one-hidden-layer MLPs that differ in their seed and in the slice
  of rows each holds out, trained together in PyTorch (one batched network) for a handful of
  epochs under a one-cycle learning rate, each keeping its best epoch on its own slice;
- `AutoHead`, which fits each candidate once and keeps the better one on a validation slice,
  as fitted.

The `train` stage fits the reduction once per feature set and each classifier on its output.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data


def validation_slice(y: np.ndarray, size: float, seed: int) -> np.ndarray:
    """A boolean mask of a seeded validation slice of about `size` of the rows: stratified, with
    at least one row of each label, or a plain seeded slice where labels are too few for that.
    The same y, size and seed give the same slice, so every candidate is judged on the same rows."""
    rows = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    wanted = max(int(np.ceil(size * len(y))), len(counts))
    if counts.min() < 2 or len(y) - wanted < len(counts):
        held = train_test_split(rows, test_size=max(1, round(size * len(y))),
                                random_state=seed)[1]
    else:
        held = train_test_split(rows, test_size=wanted, random_state=seed, stratify=y)[1]
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    return mask


def held_out_folds(y: np.ndarray, size: float, seed: int, count: int) -> np.ndarray:
    """Boolean masks (count x rows): the first `validation_slice` of y, then further seeded
    slices of the same size from the rows no earlier one holds (each stratified as it allows),
    so no row is in two and the first is every candidate's validation slice."""
    masks = np.zeros((count, len(y)), dtype=bool)
    free = np.arange(len(y))
    wanted = size * len(y)
    for k in range(count):
        if len(free) < 2:
            masks[k] = masks[0]
            continue
        held = validation_slice(y[free], min(0.5, wanted / len(free)), seed + k)
        masks[k, free[held]] = True
        free = free[~held]
    return masks


class MLPHead(ClassifierMixin, BaseEstimator):
    """A soft vote of `members` MLPs (ReLU hidden layer of `hidden` units, L2 penalty `alpha` as
    scikit-learn's MLPClassifier counts it), seeds `random_state`.., trained as one batched
    network by Adam on minibatches for `epochs` epochs under a one-cycle learning rate peaking
    at `learning_rate`. Member k holds out slice k of `held_out_folds` (`validation_size` of the
    rows each, the first being `validation_slice`) and keeps its epoch with the best accuracy
    there, so the vote learns from every row and each member is judged on rows it never saw.

    `threads` PyTorch threads train it: the same number gives the same head on any machine
    (summation order moves accuracy by about half a point), and one thread is not slowed by other
    work on a shared machine the way several are (15 times, measured on a busy 2-core box).
    """

    def __init__(self, hidden: int = 512, alpha: float = 1.0, members: int = 3,
                 epochs: int = 10, batch_size: int = 256, learning_rate: float = 3e-3,
                 validation_size: float = 0.1, threads: int = 1, random_state: int = 0) -> None:
        self.hidden = hidden
        self.alpha = alpha
        self.members = members
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_size = validation_size
        self.threads = threads
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, validation: np.ndarray | None = None
            ) -> MLPHead:
        """`validation`: a boolean mask of rows every member holds out and keeps its best epoch
        on (a split's validation part); by default member k holds out slice k of
        `held_out_folds`."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._fit(X, y, validation)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, X: np.ndarray, y: np.ndarray, validation: np.ndarray | None) -> MLPHead:
        import torch

        X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_, target = np.unique(y, return_inverse=True)
        m, d, c = self.members, X.shape[1], len(self.classes_)
        if validation is None:
            held = held_out_folds(target, self.validation_size, self.random_state, m)
        else:
            held = np.broadcast_to(np.asarray(validation, dtype=bool), (m, len(target)))
        gen = torch.Generator().manual_seed(self.random_state)
        params = [self._init(gen, (m, d, self.hidden), d), self._init(gen, (m, 1, self.hidden), d),
                  self._init(gen, (m, self.hidden, c), self.hidden),
                  self._init(gen, (m, 1, c), self.hidden)]
        # Fused: one kernel per step, a step a quarter of the default's time on one CPU thread.
        optimiser = torch.optim.Adam(params, lr=self.learning_rate, fused=True)
        steps = self.epochs * -(-len(target) // self.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, self.learning_rate,
                                                       total_steps=steps)
        x, t = torch.from_numpy(X), torch.from_numpy(target)
        trained = torch.from_numpy(~held).float()
        checks = [torch.from_numpy(np.flatnonzero(h)) for h in held]
        best_score = np.full(m, -1.0)
        best = [p.detach().clone() for p in params]
        self.best_epoch_ = np.zeros(m, dtype=int)
        for epoch in range(self.epochs):
            order = torch.randperm(len(t), generator=gen)
            for start in range(0, len(t), self.batch_size):
                rows = order[start:start + self.batch_size]
                loss = torch.nn.functional.cross_entropy(
                    self._forward(params, x[rows]).reshape(-1, c), t[rows].repeat(m),
                    reduction="none").reshape(m, -1)
                weight = trained[:, rows]
                penalty = 0.5 * self.alpha * (params[0].square().sum()
                                              + params[2].square().sum()) / len(rows)
                optimiser.zero_grad()
                ((loss * weight).sum(1) / weight.sum(1).clamp(min=1)).sum().add(penalty).backward()
                optimiser.step()
                schedule.step()
            with torch.no_grad():
                score = np.array([float((self._forward([p[k:k + 1] for p in params], x[rows])[0]
                                         .argmax(-1) == t[rows]).double().mean())
                                  if len(rows) else 0.0 for k, rows in enumerate(checks)])
            better = score > best_score
            for p, b in zip(params, best, strict=True):
                b[better] = p.detach()[better]
            best_score = np.where(better, score, best_score)
            self.best_epoch_[better] = epoch + 1
        self.weights_ = [b.numpy() for b in best]
        self.validation_accuracy_ = best_score
        return self

    @staticmethod
    def _init(gen: Any, shape: tuple[int, ...], fan_in: int) -> Any:
        """Glorot-style uniform start, as scikit-learn's MLP (bounds from the fan-in)."""
        import torch

        bound = float(np.sqrt(6.0 / (fan_in + shape[-1])))
        return (torch.rand(shape, generator=gen) * 2 * bound - bound).requires_grad_()

    @staticmethod
    def _forward(params: list[Any], x: Any) -> Any:
        import torch

        w1, b1, w2, b2 = params
        return torch.relu(torch.matmul(x, w1) + b1) @ w2 + b2

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """The members' mean class probabilities (columns = `classes_`), in numpy: predicting
        for a few added paintings never imports torch."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        w1, b1, w2, b2 = self.weights_
        logits = np.maximum(X @ w1 + b1, 0) @ w2 + b2
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=-1, keepdims=True)).mean(0).astype(np.float64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class AutoHead(ClassifierMixin, BaseEstimator):
    """Fits every candidate once and keeps the one with the best accuracy on a seeded,
    stratified validation slice (`validation_slice`) or a given validation part (the first on a
    tie); a chosen `MLPHead` is kept as fitted, the others are refitted on all rows (cheap).

    The others are fitted without the slice. An MLP is fitted as `--head mlp` fits it: its
    members hold out slices of their own, the first member the validation slice, so the vote
    learns from every row. That member's accuracy there is a floor for the vote's: when it
    already beats every other candidate nothing is left to decide; otherwise the vote is judged
    as it would do on unseen rows, by a second vote fitted with every member holding the slice
    out (and the first vote is kept if that one wins). With a given validation part every
    candidate holds it out and is judged on it."""

    def __init__(self, candidates: dict[str, BaseEstimator] | None = None,
                 validation_size: float = 0.1, random_state: int = 0) -> None:
        self.candidates = candidates
        self.validation_size = validation_size
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, validation: np.ndarray | None = None
            ) -> AutoHead:
        """`validation`: a boolean mask of the rows to choose on (a split's own validation
        part); by default `validation_slice` of the rows."""
        y = np.asarray(y)
        given = validation is not None
        if not given:
            validation = validation_slice(np.unique(y, return_inverse=True)[1],
                                          self.validation_size, self.random_state)
        fit, val = np.flatnonzero(~validation), np.flatnonzero(validation)
        self.validation_accuracy_, fitted, floors = {}, {}, set()
        for kind, candidate in self.candidates.items():
            model = clone(candidate)
            if isinstance(model, MLPHead) and not given:
                model.set_params(validation_size=self.validation_size,
                                 random_state=self.random_state).fit(X, y)
                score = float(model.validation_accuracy_[0])
                floors.add(kind)
            else:
                if isinstance(model, MLPHead):
                    model.fit(X, y, validation=validation)
                else:
                    model.fit(X[fit], y[fit])
                score = float(accuracy_score(y[val], model.predict(X[val])))
            fitted[kind] = model
            self.validation_accuracy_[kind] = round(score, 4)
        for kind in floors:
            others = [v for k, v in self.validation_accuracy_.items() if k != kind]
            if others and self.validation_accuracy_[kind] <= max(others):
                vote = clone(fitted[kind]).fit(X, y, validation=validation)
                self.validation_accuracy_[kind] = round(float(accuracy_score(
                    y[val], vote.predict(X[val]))), 4)
        self.kind_ = max(self.candidates, key=lambda k: self.validation_accuracy_[k])
        self.estimator_ = fitted[self.kind_]
        if not isinstance(self.estimator_, MLPHead):
            self.estimator_ = clone(self.candidates[self.kind_]).fit(X, y)
        self.classes_ = self.estimator_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return self.estimator_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def make_reduction(dims: int | None = 256, seed: int = 0) -> Pipeline:
    """The untrained reduction every head starts with: normalise, standardise, PCA to at most
    `dims` components (`None`: no PCA). It learns no label, so one fit serves every target."""
    steps: list[BaseEstimator] = [Normalizer(), StandardScaler()]
    if dims is not None:
        steps.append(CappedPCA(dims, random_state=seed))
    return make_pipeline(*steps)


def make_head(model: BaseEstimator, dims: int | None = 256, seed: int = 0) -> Pipeline:
    """The untrained head: the reduction (`make_reduction`), then `model`'s steps (a pipeline's
    steps are appended, so the head stays one flat pipeline)."""
    tail = model.steps if isinstance(model, Pipeline) else [(type(model).__name__.lower(), model)]
    return Pipeline([*make_reduction(dims, seed).steps, *tail])


def fit_after(head: Pipeline, reduction: Pipeline, Z: np.ndarray, y: np.ndarray,
              **fit_params: Any) -> Pipeline:
    """Fit `head`'s steps after its reduction on `Z` (rows already through the fitted
    `reduction`) and return the head with `reduction`'s fitted steps in front: the same
    pipeline `head.fit` makes when the reduction is fitted on the same rows."""
    n = len(reduction.steps)
    names = [name for name, _ in head.steps[:n]]
    if names != [name for name, _ in reduction.steps]:
        raise ValueError(f"the head starts with {names}, not with the reduction's steps")
    Pipeline(head.steps[n:]).fit(Z, y, **fit_params)
    head.steps[:n] = reduction.steps
    return head


class CappedPCA(PCA):
    """PCA to `n_components`, or to the rank the data allows when that is fewer."""

    def fit(self, X: np.ndarray, y: Any = None) -> CappedPCA:
        self._fit_capped(X)
        return self

    def fit_transform(self, X: np.ndarray, y: Any = None) -> np.ndarray:
        return self._fit_capped(X)

    def _fit_capped(self, X: np.ndarray) -> np.ndarray:
        wanted = self.n_components
        self.n_components = min(wanted, *np.shape(X))
        try:
            return PCA.fit_transform(self, X)
        finally:
            self.n_components = wanted


def logistic(c: float, max_iter: int, seed: int) -> LogisticRegression:
    """The multinomial, class-balanced logistic regression."""
    return LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter, random_state=seed)


class ShrunkWhitening(TransformerMixin, BaseEstimator):
    """Scales each column (a PCA component: they are uncorrelated) by 1 / sqrt(its variance +
    `shrink` x the mean variance): strong components come out near unit variance, weak ones
    stay near their scale. Full whitening (`shrink=0`) blew weak components up to the strong
    ones' size and a logistic regression on 144 paintings fell below chance; this keeps lbfgs
    at a tenth of the iterations it takes on the raw components (docs/heads-and-clusters.md)."""

    def __init__(self, shrink: float = 1.0) -> None:
        self.shrink = shrink

    def fit(self, X: np.ndarray, y: Any = None) -> ShrunkWhitening:
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        variance = X.var(axis=0)
        self.scale_ = 1 / np.sqrt(variance + self.shrink * variance.mean() + 1e-12)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=False) * self.scale_


def whitened_logistic(c: float, max_iter: int, seed: int, shrink: float = 1.0) -> Pipeline:
    """The logistic head's classifier: the components whitened (`ShrunkWhitening`), then
    `logistic`."""
    return Pipeline([("whiten", ShrunkWhitening(shrink)),
                     ("logisticregression", logistic(c, max_iter, seed))])


def fit_quietly(model: BaseEstimator, X: np.ndarray, y: np.ndarray,
                reduction: Pipeline | None = None, **fit_params: Any) -> bool:
    """Fit `model` (with `fit_params`, routed as a Pipeline routes them); with a fitted
    `reduction`, X has been through it and only the head's steps after it are fitted
    (`fit_after`). True unless scikit-learn warned that it did not converge."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if reduction is None:
            model.fit(X, y, **fit_params)
        else:
            fit_after(model, reduction, X, y, **fit_params)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)
