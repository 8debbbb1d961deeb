"""The project's learners as scikit-learn estimators: clustering, projection and heads.

They know nothing of runs: the `cluster` and `train` stages build them from their constants,
key their steps by `get_params()`, fit them and write what they learnt.
"""

from influence.estimators.clustering import ElbowClustering, Projection, Reducer, kneedle
from influence.estimators.heads import AutoHead, MLPHead, make_head, make_reduction

__all__ = ["AutoHead", "ElbowClustering", "MLPHead", "Projection", "Reducer", "kneedle",
           "make_head", "make_reduction"]
