"""How close two computations of one quantity must be: stated once, for the whole suite.

Many tests compare two paths to the same float32 value: a fused attention kernel against gmar's
explicit ``softmax(q kᵀ) v``, the joint pass against a method alone, a chunked stream against the
whole batch, a batch against a loop, gmar against an independent reference (tests/reference.py).
They differ by rounding only, and rounding depends on the CPU, the BLAS build and the thread count
(a sum split over two threads is added in another order), so a tolerance tuned until one machine
passes fails on the next one.

The bound comes from float32 itself. One operation is exact to a relative ε = 2⁻²³ ≈ 1.19e-7. A value
of the tiny test models travels through a few hundred operations before a test reads it: dot
products of up to 128 terms, three or four blocks forward and as many backward, a rollout that
multiplies one matrix per layer, then a min-max normalisation that divides by the map's range.
Independent rounding errors add like a random walk, so n operations err by about √n·ε; with n of a
few thousand that is about 2⁶·ε, and 2⁸·ε ≈ 3.05e-5 leaves a factor 4 for the error growth of the
products and the normalisation. Relative and absolute alike: the values compared are of order one
(maps in [0, 1], probabilities, unit embeddings), so the absolute part only matters near zero.

A real defect (a wrong layer, a missing residual, a gradient paired with the wrong head) moves
values by 1e-2 or more, far above this bound; every test that a change must break also checks a
case that differs (another layer, another class, another option).
"""

from __future__ import annotations

import torch

#: float32's machine epsilon, 2⁻²³
EPS = torch.finfo(torch.float32).eps

#: one float32 quantity computed two ways (``assert_close(a, b, **FLOAT32)``)
FLOAT32 = dict(rtol=2**8 * EPS, atol=2**8 * EPS)
