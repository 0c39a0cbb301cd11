"""``gmar.metrics`` is :mod:`gmar.eval.metrics`, the metrics' home, under the name the docs use."""

import sys

from gmar.eval import metrics

sys.modules[__name__] = metrics
