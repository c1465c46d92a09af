"""Memory and FLOPs of a training step, estimated on fake tensors: ``laps-estimate``.

``fake`` (fake parameters, CUDA autocast under the fake mode), ``step`` (one steady-state step of
the LightningModule, :class:`~laps.estimate.step.Simulator`), ``run`` (the configuration's figures,
``max_batch``, ``estimate.json``).
"""

from laps.estimate.run import estimate, max_batch, target_of, write_estimate
from laps.estimate.step import Simulator, StepMemory, StepShape, gradient_pattern

__all__ = ["Simulator", "StepMemory", "StepShape", "estimate", "gradient_pattern", "max_batch", "target_of",
           "write_estimate"]
