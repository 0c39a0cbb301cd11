"""The evaluation harness, one job per module:

- :mod:`~gmar.eval.metrics`: the metrics themselves (tensors in, one value per image out);
- :mod:`~gmar.eval.registry`: one :class:`~gmar.eval.registry.Metric` entry per metric evaluate
  scores (name, direction, group, ``--metrics`` selector, needs, function);
- :mod:`~gmar.eval.datasets`: the items (scenes, image folders, ImageNet-Segmentation) and their keys;
- :mod:`~gmar.eval.store`: the per-item results in SQLite;
- :mod:`~gmar.eval.harness`: the loop that explains, scores and stores (:func:`~gmar.eval.harness.evaluate`);
- :mod:`~gmar.eval.report`: the tables and plots;
- :mod:`~gmar.eval.distributed`: ``torchrun``'s rank, world size and barrier;
- :mod:`~gmar.eval.scenes` and :mod:`~gmar.eval.reference`: the synthetic scenes and the reference
  model trained on them.

Nothing here is loaded by ``import gmar``; the metrics take a model, images, maps and targets and
know nothing about how the maps were made, so they score any method, gmar's or a user's.
"""
