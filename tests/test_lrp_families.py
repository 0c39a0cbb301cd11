"""AttnLRP on every family: with ``attention="cp"`` and every source of relevance but the input zeroed
(biases, class / register / distillation tokens, position embeddings, relative position biases), the
relevance summed over the pixels equals the explained score. Each element-wise non-linearity or norm
the rules missed, or an attention core outside gmar's stream, breaks this equality by far more than
float64 rounding; so does a gate or a non-linear pooling, which is why the check explains a linear
functional of the output (``out @ w``, a fixed ``w``): conservation is of a linear score.

Chefer et al.'s rules (``transformer_attribution``, ``partial_lrp``) run where their residual sums are
declared; elsewhere each refuses in one line naming ``attnlrp``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gmar
from conftest import FACTORIES, IMAGE
from tolerance import FLOAT32

#: parameter names that add to the tokens rather than multiply them: they carry relevance of their own
ADDED = ("bias", "token", "pos_embed", "position", "positional", "class_embedding", "relative_position", "rel_pos")


def without_added_relevance(model: torch.nn.Module) -> torch.nn.Module:
    clone = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, parameter in clone.named_parameters():
            if any(part in name for part in ADDED):
                parameter.zero_()
    return clone


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_attnlrp_conserves_a_linear_score_on_every_family(name):
    model = without_added_relevance(FACTORIES[name]())
    if "attnlrp" not in gmar.supported_methods(model):
        with pytest.raises(gmar.UnsupportedModelError) as refused:
            gmar.AttnLRP(model)
        assert "\n" not in str(refused.value)
        return
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        width = gmar.get_adapter(model).forward(images).shape[-1]
    weights = torch.randn(width, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    explanation = gmar.AttnLRP(model)(images, target=lambda out: out @ weights)
    total = explanation.pixels.double().sum(dim=(1, 2))
    scale = explanation.scores.abs().max()
    # the model runs in float64; an Explanation holds its maps in float32, whose rounding bounds this
    torch.testing.assert_close(total / scale, explanation.scores / scale, **FLOAT32)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_chefer_rules_run_or_refuse_in_one_line(name):
    model = FACTORIES[name]()
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))
    for method in ("transformer_attribution", "partial_lrp"):
        if method in gmar.supported_methods(model):
            explanation = gmar.explain(model, images, method)
            gae = gmar.explain(model, images, "gae")
            assert explanation.token_map.shape == gae.token_map.shape
            assert torch.isfinite(explanation.token_map).all()
        else:
            with pytest.raises(gmar.UnsupportedModelError) as refused:
                gmar.explain(model, images, method)
            assert "\n" not in str(refused.value) and "attnlrp" in str(refused.value)
