"""Classifier heads on frozen features, as scikit-learn estimators.

`make_head` builds the full pipeline: L2 normalisation, standardisation, a PCA to at most `dims`
components (the features of a head are redundant: 2,660 columns of the three-part set carry what
a few hundred components do, and every fit then costs a fraction), then the classifier:

- `LogisticRegression`, multinomial and class-balanced (scikit-learn's own);
- `MLPHead`, a soft vote of one-hidden-layer MLPs that differ only in their seed, trained
  together in PyTorch (one batched network, every thread) with early stopping on a seeded,
  stratified validation slice;
- `AutoHead`, which fits each candidate once on the same rows and keeps the better one on a
  validation slice, as fitted.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data


def _stratified(y: np.ndarray, size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit, validation) positions of y, each sorted: stratified, with at least one row
    of each label in the validation slice; a plain seeded split where labels are too few for
    that. Sorted, so a head fitted on a given slice sees its rows in the same order."""
    rows = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    wanted = max(int(np.ceil(size * len(y))), len(counts))
    if counts.min() < 2 or len(y) - wanted < len(counts):
        parts = train_test_split(rows, test_size=max(1, round(size * len(y))), random_state=seed)
    else:
        parts = train_test_split(rows, test_size=wanted, random_state=seed, stratify=y)
    return np.sort(parts[0]), np.sort(parts[1])


class MLPHead(ClassifierMixin, BaseEstimator):
    """A soft vote of `members` MLPs (ReLU hidden layer of `hidden` units, L2 penalty `alpha` as
    scikit-learn's MLPClassifier counts it), seeds `random_state`.., trained as one batched
    network by Adam on minibatches; each member keeps its epoch with the best accuracy on a
    stratified validation slice and stops after `patience` epochs without a better one.

    `threads` PyTorch threads train it: the same number gives the same head on any machine
    (summation order moves accuracy by about half a point), and one thread is not slowed by other
    work on a shared machine the way several are (15 times, measured on a busy 2-core box).
    """

    def __init__(self, hidden: int = 512, alpha: float = 1.0, members: int = 3,
                 patience: int = 10, max_epochs: int = 200, batch_size: int = 200,
                 learning_rate: float = 1e-3, validation_size: float = 0.1,
                 threads: int = 1, random_state: int = 0) -> None:
        self.hidden = hidden
        self.alpha = alpha
        self.members = members
        self.patience = patience
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_size = validation_size
        self.threads = threads
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, validation: np.ndarray | None = None
            ) -> MLPHead:
        """`validation`: a boolean mask of the rows to stop on (the others are trained on); by
        default a seeded, stratified `validation_size` of the rows."""
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
        if validation is None:
            fit, val = _stratified(target, self.validation_size, self.random_state)
        else:
            fit, val = np.flatnonzero(~validation), np.flatnonzero(validation)
        m, d, c = self.members, X.shape[1], len(self.classes_)
        gen = torch.Generator().manual_seed(self.random_state)
        params = [self._init(gen, (m, d, self.hidden), d), self._init(gen, (m, 1, self.hidden), d),
                  self._init(gen, (m, self.hidden, c), self.hidden),
                  self._init(gen, (m, 1, c), self.hidden)]
        optimiser = torch.optim.Adam(params, lr=self.learning_rate)
        xf, yf = torch.from_numpy(X[fit]), torch.from_numpy(target[fit])
        xv, yv = torch.from_numpy(X[val]), torch.from_numpy(target[val])
        best_score = np.full(m, -1.0)
        best = [p.detach().clone() for p in params]
        since = np.zeros(m, dtype=int)
        self.n_epochs_ = np.zeros(m, dtype=int)
        for epoch in range(self.max_epochs):
            order = torch.randperm(len(xf), generator=gen)
            for start in range(0, len(xf), self.batch_size):
                rows = order[start:start + self.batch_size]
                logits = self._forward(params, xf[rows])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, c), yf[rows].repeat(m), reduction="sum") / len(rows)
                penalty = 0.5 * self.alpha * (params[0].square().sum()
                                              + params[2].square().sum()) / len(rows)
                optimiser.zero_grad()
                (loss + penalty).backward()
                optimiser.step()
            with torch.no_grad():
                score = (self._forward(params, xv).argmax(-1) == yv).double().mean(1).numpy()
            running = since < self.patience
            better = running & (score > best_score)
            for p, b in zip(params, best, strict=True):
                b[better] = p.detach()[better]
            best_score = np.where(better, score, best_score)
            since = np.where(better, 0, since + running)
            self.n_epochs_[running] = epoch + 1
            if not (since < self.patience).any():
                break
        self.weights_ = [b.numpy() for b in best]
        self.validation_accuracy_ = best_score
        self.converged_ = bool((since >= self.patience).all())
        if not self.converged_:
            warnings.warn(f"MLPHead: still improving after {self.max_epochs} epochs",
                          ConvergenceWarning, stacklevel=2)
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
        """The members' mean class probabilities (columns = `classes_`)."""
        import torch

        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        with torch.no_grad():
            logits = self._forward([torch.from_numpy(w) for w in self.weights_],
                                   torch.from_numpy(X))
            return torch.softmax(logits, -1).mean(0).numpy().astype(np.float64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class AutoHead(ClassifierMixin, BaseEstimator):
    """Fits every candidate once, all on the same rows, keeps the one with the best accuracy on
    a seeded, stratified validation slice (or a given validation part; the first on a tie).
    A candidate that stops early (`MLPHead`) stops on that slice and is kept as fitted: a refit
    on all rows would hold out a slice of the same size for its early stopping anyway, so it is
    the head `--head mlp` trains. The others are fitted without the slice and, if chosen,
    refitted on all rows (they are cheap: the MLP was most of the cost)."""

    def __init__(self, candidates: dict[str, BaseEstimator] | None = None,
                 validation_size: float = 0.1, random_state: int = 0) -> None:
        self.candidates = candidates
        self.validation_size = validation_size
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, validation: np.ndarray | None = None
            ) -> AutoHead:
        """`validation`: a boolean mask of the rows to choose on (a split's own validation
        part); by default a seeded, stratified `validation_size` of the rows."""
        y = np.asarray(y)
        if validation is None:
            validation = np.zeros(len(y), dtype=bool)
            validation[_stratified(y, self.validation_size, self.random_state)[1]] = True
        fit, val = np.flatnonzero(~validation), np.flatnonzero(validation)
        self.validation_accuracy_, fitted = {}, {}
        for kind, candidate in self.candidates.items():
            model = clone(candidate)
            if isinstance(model, MLPHead):
                model.fit(X, y, validation=validation)
            else:
                model.fit(X[fit], y[fit])
            fitted[kind] = model
            self.validation_accuracy_[kind] = round(float(accuracy_score(y[val],
                                                                         model.predict(X[val]))), 4)
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


def make_head(model: BaseEstimator, dims: int | None = 256, seed: int = 0) -> Pipeline:
    """The untrained head: normalise, standardise, PCA to at most `dims` components, `model`.

    `dims=None` keeps every column. The PCA is capped at what the training rows allow at fit time
    (scikit-learn refuses more components than rows or columns).
    """
    steps: list[BaseEstimator] = [Normalizer(), StandardScaler()]
    if dims is not None:
        steps.append(CappedPCA(dims, random_state=seed))
    return make_pipeline(*steps, model)


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
    """The multinomial, class-balanced logistic regression head."""
    return LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter, random_state=seed)


def fit_quietly(model: BaseEstimator, X: np.ndarray, y: np.ndarray, **fit_params: Any) -> bool:
    """Fit `model` (with `fit_params`, routed as a Pipeline routes them); True unless
    scikit-learn warned that it did not converge."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y, **fit_params)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)
