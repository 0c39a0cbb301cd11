"""The evaluation harness: metrics, datasets, the per-item store, the evaluation loop, its report,
distributed running, and the synthetic scenes with the reference model trained on them.

Nothing here is loaded by ``import gmar``; the metrics take a model, images, maps and targets and
know nothing about how the maps were made, so they score any method, gmar's or a user's.
"""
