"""A component's own learning rate on top of spaCy's single pipeline optimizer."""
from typing import Any

from thinc.api import Optimizer


class ScaledOptimizer:
    """The pipeline's optimizer with every learning rate times ``scale`` (one component's own rate).

    Thinc's optimizers take ``lr_scale`` per update; schedules, Adam moments and the
    step counts stay those of the wrapped optimizer.
    """

    def __init__(self, optimizer: Optimizer, scale: float):
        self.optimizer = optimizer
        self.scale = scale

    def __call__(self, key, weights, gradient, *, lr_scale: float = 1.0):
        return self.optimizer(key, weights, gradient, lr_scale=lr_scale * self.scale)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)
