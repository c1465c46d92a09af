"""Speed and memory of the LAPS head against the official-style reference loop (``laps-bench``).

Measured on the given device, each against :func:`laps.models.reference.reference_similarity` in
the same run:

* **head training step** at training shapes (``batch`` images x ``batch`` captions): forward in
  train mode, loss, backward. Two losses: the official one (hinge with hardest negatives plus the
  ratio loss, weights from the training recipe; from epoch 1 on, only about ``3 x batch`` pairs
  then carry a gradient) and ``sims.sum()`` (every pair carries one, the worst case, like the
  first epoch) (:mod:`laps.benchmarks.head`);
* **scoring** of ``N_img x N_cap`` pairs from cached embeddings (evaluation); the reference may be
  timed on a subset of captions and scaled per pair (it is a loop over captions);
* **memory** of a head training step: CUDA peak allocated minus allocated before; on CPU the peak
  resident memory after the step minus the resident memory before it, each implementation in a
  fresh subprocess (:mod:`laps.benchmarks.memory`);
* optionally a full training step of a backbone (encoders with random weights, head, and
  ``laps-train``'s loss, optimizer and gradient clipping read from the Hydra configs,
  :mod:`laps.benchmarks.recipe`) at ``batch``, bf16 autocast on CUDA, in pairs/s
  (:mod:`laps.benchmarks.train_step`).

:func:`run_benchmarks` runs what a :class:`BenchSettings` asks for and returns the result that
``laps-bench`` prints and writes as JSON.
"""

from laps.benchmarks.inputs import BACKBONES, CPU_SCORING, F30K_LENGTHS, GPU_SCORING, BenchSettings
from laps.benchmarks.memory import memory_growth
from laps.benchmarks.recipe import TrainRecipe, training_recipe
from laps.benchmarks.suite import run_benchmarks

__all__ = [
    "BACKBONES", "CPU_SCORING", "F30K_LENGTHS", "GPU_SCORING", "BenchSettings", "TrainRecipe", "memory_growth",
    "run_benchmarks", "training_recipe",
]
