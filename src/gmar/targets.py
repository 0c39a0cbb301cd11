"""Turning the ``target`` argument into one score per sample, and text-prompt targets for CLIP models."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmar.errors import TargetError, warn

Target = Union[None, int, Sequence[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def resolve_target(
    output: torch.Tensor, target: Target, *, is_classifier: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The score ``y`` ``(B,)`` to explain, and the explained classes ``(B,)`` (None for a callable).

    ``target`` is None (each sample's predicted class), an integer scalar (a Python or numpy int,
    or a 0-dim integer tensor or array: the same class for every sample), ``B`` ints, or a callable
    ``f(model_output) -> (B,)`` scores (such as :class:`TextTarget`).
    """
    batch = output.shape[0]
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (batch,):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise TargetError(f"a callable target must return a tensor of shape ({batch},), got {shape}")
        return scores, None
    if not is_classifier:
        raise TargetError(
            "this model returns an image embedding, not class logits: pass a callable target "
            "f(embedding) -> (B,) scores, e.g. the cosine similarity with a text embedding"
        )
    if output.ndim != 2:
        raise TargetError(f"expected logits of shape (B, classes), got {tuple(output.shape)}")
    num_classes = output.shape[1]
    if target is None:
        classes = output.detach().argmax(dim=-1)
    elif isinstance(target, (bool, np.bool_)):
        raise TargetError("target must be a class index, not a bool")
    elif isinstance(target, (str, bytes)):
        raise TargetError(f"target must be None, an int, {batch} class indices or a callable, not a string")
    elif isinstance(target, numbers.Integral):  # int, numpy integers
        classes = torch.full((batch,), int(target), dtype=torch.long, device=output.device)
    else:
        try:
            classes = torch.as_tensor(target, device=output.device)
        except (TypeError, ValueError) as error:
            raise TargetError(f"target must be None, an int, {batch} ints or a callable: {error}") from None
        if classes.dtype == torch.bool:
            raise TargetError("target must be class indices, not bools")
        if classes.ndim == 0 and not classes.is_floating_point() and not classes.is_complex():
            classes = classes.expand(batch)  # a 0-dim integer tensor or array: one class for every sample
        if classes.is_floating_point() or classes.is_complex() or classes.shape != (batch,):
            raise TargetError(
                f"target must hold {batch} integer class indices, got {classes.dtype} of shape {tuple(classes.shape)}"
            )
        classes = classes.long()
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise TargetError(f"target classes must be in [0, {num_classes}), got {classes.tolist()}")
    return output.gather(1, classes[:, None]).squeeze(1), classes


def score_of(output: torch.Tensor, target: Target, classes: torch.Tensor | None) -> torch.Tensor:
    """The score of another output of the same batch (a layer's readout) for an already resolved target."""
    if classes is not None:
        return output.gather(1, classes[:, None]).squeeze(1)
    return target(output)  # type: ignore[misc,operator]


def prepare_images(target: Target, images: torch.Tensor) -> torch.Tensor:
    """Let a target that pairs images with several prompts shape the batch (see :class:`TextTarget`)."""
    prepare = getattr(target, "prepare_images", None)
    return prepare(images) if callable(prepare) else images


class TextTarget:
    """Cosine similarity between each image's embedding and a text prompt's embedding (CLIP and SigLIP models).

    ``target = gmar.TextTarget(model, tokenizer, ["a photo of a cat", "a remote control"])`` is a
    callable target for every gradient method:

    * one prompt and ``B`` images: each image is scored against the prompt (``B`` maps);
    * ``P`` prompts and one image: the image is repeated ``P`` times, copy ``p`` is scored against
      prompt ``p`` (``P`` maps, in the order of the prompts);
    * ``P`` prompts and ``P`` images: image ``i`` against prompt ``i``.

    The text embeddings are computed once, here, without gradients, with the model in eval mode
    (its modes are restored) and its lock held (:func:`gmar.capture.model_lock`).

    Args:
        model: the CLIP model: an OpenCLIP model (``encode_text``) or a transformers ``CLIPModel`` /
            ``SiglipModel`` (``get_text_features``; MetaCLIP 2 and SigLIP 2 too).
        tokenizer: the model's tokenizer, e.g. ``open_clip.get_tokenizer(name)`` (a callable from a
            list of strings to token ids), or the transformers tokenizer or processor of the model
            (``AutoTokenizer`` / ``AutoProcessor``), which pads as the model was trained.
        prompts: one prompt or a list of prompts.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, prompts: str | Sequence[str]) -> None:
        from gmar.capture import frozen_eval

        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise TargetError("TextTarget needs one prompt or a non-empty list of prompts (strings)")
        for index, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise TargetError(f'prompt {index} is empty: give the text to explain, e.g. "a photo of a cat"')
        encode = getattr(model, "encode_text", None)
        transformers_model = not callable(encode) and callable(getattr(model, "get_text_features", None))
        if not callable(encode) and not transformers_model:
            raise TargetError(
                f"{type(model).__name__} has no text tower (encode_text or get_text_features): text targets need "
                "a CLIP model"
            )
        self.model, self.tokenizer = model, tokenizer
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else None
        # inference_mode(False) also around the normalisation: an inference tensor here could not
        # take part in the explanation's backward pass.
        with torch.inference_mode(False), torch.no_grad(), frozen_eval(model):
            if transformers_model:
                from gmar.adapters.hf_clip import text_features, token_counts

                _warn_cut(self.prompts, token_counts(model, tokenizer, self.prompts))
                embeddings = text_features(model, tokenizer, self.prompts, device)
            else:
                _warn_cut(self.prompts, _openclip_token_counts(model, tokenizer, self.prompts))
                tokens = tokenizer(self.prompts)
                if isinstance(tokens, dict) or hasattr(tokens, "input_ids"):
                    tokens = tokens["input_ids"]
                embeddings = encode(torch.as_tensor(tokens, device=device))
            #: ``(P, D)`` the prompts' text embeddings, normalised to unit length.
            self.embeddings = F.normalize(embeddings.float(), dim=-1)

    def with_prompts(self, prompts: str | Sequence[str]) -> TextTarget:
        """The same model and tokenizer with other prompts."""
        return TextTarget(self.model, self.tokenizer, prompts)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Repeat a single image once per prompt; check that the batch pairs with the prompts."""
        count, batch = len(self.prompts), images.shape[0]
        if count > 1 and batch == 1:
            return images.repeat(count, 1, 1, 1)
        if count not in (1, batch):
            raise TargetError(
                f"{count} prompts and {batch} images: give one prompt, one image, or as many images as prompts"
            )
        return images

    def __call__(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.ndim != 2 or embedding.shape[-1] != self.embeddings.shape[-1]:
            raise TargetError(
                f"expected image embeddings (B, {self.embeddings.shape[-1]}), got {tuple(embedding.shape)}"
            )
        text = self.embeddings.to(device=embedding.device, dtype=embedding.dtype)
        if len(self.prompts) > 1 and embedding.shape[0] != len(self.prompts):
            raise TargetError(f"{len(self.prompts)} prompts need {len(self.prompts)} image embeddings")
        return (F.normalize(embedding, dim=-1) * text.expand_as(embedding)).sum(dim=-1)

    def __repr__(self) -> str:
        return f"TextTarget({self.prompts!r})"


def _openclip_token_counts(model: nn.Module, tokenizer: Callable, prompts: list[str]) -> tuple[list[int], int] | None:
    """Each prompt's length in tokens, start and end tokens included, and the text tower's context length,
    for OpenCLIP's tokenizers (which cut longer prompts silently); None for a tokenizer gmar cannot count with."""
    limit = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", None)
    if not isinstance(limit, int) or getattr(tokenizer, "reduction_fn", None) is not None:
        return None  # no known length, or a tokenizer that drops tokens by its own rule, not by position
    encode = getattr(tokenizer, "encode", None)
    if callable(encode) and hasattr(tokenizer, "sot_token_id"):  # SimpleTokenizer: BPE ids without start and end
        return [len(encode(prompt)) + 2 for prompt in prompts], limit
    inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer, SigLipTokenizer: a transformers tokenizer inside
    if inner is not None and type(inner).__module__.startswith("transformers."):
        return [len(ids) for ids in inner(prompts, truncation=False, verbose=False)["input_ids"]], limit
    return None


def _warn_cut(prompts: list[str], counts: tuple[list[int], int] | None) -> None:
    """One warning per prompt longer than the text tower reads: the tokenizer cuts it without a word."""
    if counts is None:
        return
    lengths, limit = counts
    for index, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
        if length > limit:
            short = prompt if len(prompt) <= 40 else prompt[:39] + "…"
            warn(
                f'prompt {index} ("{short}") is {length} tokens long, but the text tower reads {limit}: '
                f"only its first {limit} tokens are explained"
            )
