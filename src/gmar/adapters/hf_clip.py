"""Hugging Face image-text models and their vision towers: CLIP, MetaCLIP 2, SigLIP and SigLIP 2.

Which output is explained:

* ``CLIPModel`` / ``SiglipModel`` (and MetaCLIP 2, SigLIP 2): the image embedding ``get_image_features``
  returns (CLIP's is projected), so targets are callables on it, e.g. :class:`gmar.TextTarget`;
* ``…VisionModel``: the pooled output; ``…VisionModelWithProjection``: ``image_embeds``;
* ``…ForImageClassification``: the logits.

How the tower pools: CLIP reads the CLS token (``post_layernorm``, then the projection); CLIP's classifier
the mean of the patch tokens, without a final norm; SigLIP's classifier the mean of all tokens (there is
no CLS token) after ``post_layernorm``; SigLIP's embedding comes from an attention-pooling head (a learned
probe attending to the tokens through ``nn.MultiheadAttention``), so only ``legrad`` and ``gradcam``
explain it.

SigLIP 2 (NaFlex) takes patches, not images: gmar cuts a ``(B, 3, H, W)`` batch into its patches in the
processor's order, with ``spatial_shapes`` the batch's grid and no padding (so no
``pixel_attention_mask``); the model resizes its position embeddings to that grid, so any size that is a
multiple of the patch size works.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from gmar.adapters.base import ModelAdapter, check_pooling
from gmar.adapters.hf_vit import class_names, instrument_attention
from gmar.adapters.mha import ExplicitAttention
from gmar.capture import Recorder
from gmar.errors import InputSizeError, UnsupportedModelError
from gmar.layout import TokenLayout
from gmar.preprocess import PreprocessConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class _Kind:
    #: the attribute holding the vision transformer ("": the model is the vision transformer)
    tower: str
    #: what ``forward`` returns: "features" (``get_image_features``), "pooled" (``pooler_output``),
    #: "image_embeds", "logits"
    output: str
    #: how the output reads the last block's tokens: "cls", "patch_mean" (CLIP's classifier), "mean"
    #: (SigLIP's classifier, after the final norm), "head" (SigLIP's attention-pooling head)
    pooling: str
    #: the projection after the pooled CLS token, if any
    projection: str | None = None


def _kinds() -> dict[str, _Kind]:
    kinds = {}
    for family in ("CLIP", "MetaClip2"):
        kinds[f"{family}Model"] = _Kind("vision_model", "features", "cls", "visual_projection")
        kinds[f"{family}VisionModel"] = _Kind("", "pooled", "cls")
        kinds[f"{family}VisionModelWithProjection"] = _Kind("vision_model", "image_embeds", "cls", "visual_projection")
        kinds[f"{family}ForImageClassification"] = _Kind("vision_model", "logits", "patch_mean")
    for family in ("Siglip", "Siglip2"):
        kinds[f"{family}Model"] = _Kind("vision_model", "features", "head")
        kinds[f"{family}VisionModel"] = _Kind("", "pooled", "head")
        kinds[f"{family}ForImageClassification"] = _Kind("vision_model", "logits", "mean")
    return kinds


_KINDS = _kinds()


class HFCLIPAdapter(ModelAdapter):
    family = "hf"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and any(
            klass.__name__ in _KINDS for klass in type(model).__mro__
        )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        self._kind = _KINDS[next(klass.__name__ for klass in type(model).__mro__ if klass.__name__ in _KINDS)]
        tower = getattr(model, self._kind.tower) if self._kind.tower else model
        self._tower = tower
        self.is_classifier = self._kind.output == "logits"  # type: ignore[misc]
        self._blocks = list(tower.encoder.layers)
        self._attention = [block.self_attn for block in self._blocks]
        if not all(hasattr(attn, "out_proj") and hasattr(attn, "num_heads") for attn in self._attention):
            raise UnsupportedModelError(f"{name}: gmar supports the attention modules of transformers >= 5")
        #: SigLIP 2 embeds patches, not images (NaFlex)
        self._naflex = isinstance(tower.embeddings.patch_embedding, nn.Linear)
        self._prefix = 1 if hasattr(tower.embeddings, "class_embedding") else 0
        if self._kind.pooling == "head":
            head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
            attention = getattr(head, "attention", None)
            if not isinstance(attention, nn.MultiheadAttention) or not attention.batch_first:
                family = "Siglip2" if name.startswith("Siglip2") else "Siglip"
                raise UnsupportedModelError(
                    f"{name}: its vision tower has no attention-pooling head (vision_use_head=False), so no pooled "
                    f"output to explain; a {family}ForImageClassification on the same tower (mean pooling) can be"
                )
            self.attention_pooled = True
            #: the official LeGrad code's readout for SigLIP: the head on the tokens without the final norm
            self.extra_poolings = ("no_final_norm",)  # type: ignore[misc]

    @property
    def num_layers(self) -> int:
        return len(self._attention)

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        patch = self._tower.config.patch_size
        if image_size[0] % patch or image_size[1] % patch:
            raise InputSizeError(
                f"{type(self.model).__name__} takes inputs whose sides are multiples of its patch size {patch}, "
                f"got {image_size[0]}x{image_size[1]}; resize or crop the images"
            )
        pooling = self._kind.pooling
        return TokenLayout(
            num_prefix_tokens=self._prefix,
            grid_size=(image_size[0] // patch, image_size[1] // patch),
            patch_size=(patch, patch),
            readout_prefix=(0,) if pooling == "cls" else (),
            readout_patches=pooling in ("patch_mean", "mean"),
            attention_pooled=self.attention_pooled,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self._inputs(images)
        output = self._kind.output
        if output == "features":
            features = self.model.get_image_features(**inputs)
            return features if isinstance(features, torch.Tensor) else features.pooler_output
        result = self.model(**inputs)
        if output == "pooled":
            return result.pooler_output
        return result.image_embeds if output == "image_embeds" else result.logits

    def _inputs(self, images: torch.Tensor) -> dict:
        """The model's keyword arguments for a batch ``(B, 3, H, W)``."""
        if not self._naflex:
            size = self._tower.config.image_size
            return {"pixel_values": images, "interpolate_pos_encoding": tuple(images.shape[-2:]) != (size, size)}
        batch, channels, height, width = images.shape
        patch = self._tower.config.patch_size
        rows, columns = height // patch, width // patch
        # the processor's order: patches row-major, each flattened as (patch row, patch column, channel)
        patches = images.reshape(batch, channels, rows, patch, columns, patch).permute(0, 2, 4, 3, 5, 1)
        return {
            "pixel_values": patches.reshape(batch, rows * columns, patch * patch * channels),
            "pixel_attention_mask": None,
            "spatial_shapes": torch.tensor([[rows, columns]] * batch, device=images.device),
        }

    @contextmanager
    def instrument(self, recorder: Recorder) -> Iterator[None]:
        with instrument_attention(self._tower, self._attention, self._merged_heads(), recorder):
            yield

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self._blocks)

    def first_norm(self, layer: int) -> nn.Module:
        return self._blocks[layer].layer_norm1

    def _merged_heads(self) -> list[tuple[nn.Module, int]]:
        """Each layer's module whose input is its heads' outputs concatenated, and its number of heads:
        where the capture splits (and head ablation switches off) the heads."""
        return [(attn.out_proj, attn.num_heads) for attn in self._attention]

    def readout(self, tokens: torch.Tensor, pooling: str = "model") -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pooling(self, pooling)
        kind, tower = self._kind, self._tower
        if kind.pooling == "patch_mean":
            return self.model.classifier(tokens[:, self._prefix :].mean(dim=1)), None
        if kind.pooling == "mean":
            return self.model.classifier(tower.post_layernorm(tokens).mean(dim=1)), None
        if kind.pooling == "head":
            return _attention_pool(tower.head, tokens if pooling == "no_final_norm" else tower.post_layernorm(tokens))
        pooled = tower.post_layernorm(tokens[:, 0])
        return (getattr(self.model, kind.projection)(pooled) if kind.projection else pooled), None

    def preprocess_config(self) -> PreprocessConfig:
        # The models carry no normalisation; these are the families' defaults. `gmar.load_model` reads the
        # saved image processor instead, where there is one.
        config = self._tower.config
        if self._naflex:  # SigLIP 2's processor fits at most `num_patches` patches: a square of them
            side = int(config.num_patches**0.5) * config.patch_size
            return PreprocessConfig(input_size=(side, side), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")  # type: ignore[arg-type]
        size = (config.image_size, config.image_size)
        if self._prefix == 0:  # SigLIP
            return PreprocessConfig(input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")  # type: ignore[arg-type]
        return PreprocessConfig(input_size=size, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic")

    def class_names(self) -> list[str] | None:
        return class_names(self.model.config) if self.is_classifier else None


def _attention_pool(head: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's ``MultiheadAttentionPoolingHead`` on final-normed tokens ``(B, N, D)``, its attention written out.

    Returns the pooled output ``(B, D)`` and the probe's attention ``(B, heads, 1, N)`` on the graph.
    """
    probe = head.probe.expand(tokens.shape[0], -1, -1)
    attention = ExplicitAttention(head.attention, 0, Recorder(1))
    pooled, probabilities = attention(probe, tokens, tokens, need_weights=True, average_attn_weights=False)
    pooled = pooled + head.mlp(head.layernorm(pooled))
    return pooled[:, 0], probabilities  # type: ignore[return-value]


def token_counts(model: nn.Module, tokenizer, prompts: list[str]) -> tuple[list[int], int] | None:
    """Each prompt's length in tokens (special tokens included) and the text tower's length, which
    :func:`text_features` truncates to; None for a tokenizer that is not transformers'."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    if not type(tokenizer).__module__.startswith("transformers."):
        return None
    ids = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    return [len(row) for row in ids], model.config.text_config.max_position_embeddings


def text_features(model: nn.Module, tokenizer, prompts: list[str], device: torch.device | None) -> torch.Tensor:
    """``(P, D)`` the prompts' embeddings from ``model.get_text_features``, not normalised.

    ``tokenizer`` is the model's transformers tokenizer or processor (or any callable from a list of
    strings to token ids). SigLIP was trained on prompts padded to the text tower's full length
    (``padding="max_length"``); CLIP pools its end-of-text token, so padding to the longest prompt is
    enough. The attention mask goes along where the tokenizer gives one.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    text_config = model.config.text_config
    if type(tokenizer).__module__.startswith("transformers."):
        siglip = "siglip" in model.config.model_type
        tokens = tokenizer(
            prompts,
            padding="max_length" if siglip else True,
            truncation=True,
            max_length=text_config.max_position_embeddings,
            return_tensors="pt",
        )
    else:
        tokens = tokenizer(prompts)
    if isinstance(tokens, torch.Tensor):
        tokens = {"input_ids": tokens}
    keys = [key for key in ("input_ids", "attention_mask") if key in tokens]
    inputs = {key: torch.as_tensor(tokens[key], device=device) for key in keys}
    features = model.get_text_features(**inputs)
    return features if isinstance(features, torch.Tensor) else features.pooler_output
