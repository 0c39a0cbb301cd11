"""`gmar explain --prompt` end to end on a tiny OpenCLIP model registered as a local architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import gmar
from gmar import viz
from gmar.frontends.cli import main
from tolerance import FLOAT32

ARCH = "gmar-test-tiny-clip"
PROMPTS = ["a photo of a cat", "a remote control"]


@pytest.fixture(scope="module", autouse=True)
def tiny_clip_arch(tmp_path_factory):
    """Register a tiny CLIP architecture with OpenCLIP, as a user registers a local config."""
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("clip-config") / f"{ARCH}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


@pytest.fixture
def pictures(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for name, size in (("room", (40, 56)), ("garden", (32, 32))):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run(*argv: str) -> int:
    return main(["explain", *argv, "--model", f"openclip:{ARCH}", "--random-init"])


def expected_map(path, prompt: str, method: str) -> np.ndarray:
    """The heatmap the library gives for one image and one prompt, loaded the way the CLI loads."""
    loaded = gmar.load_model(f"openclip:{ARCH}", pretrained=False)
    batch = gmar.preprocess([gmar.load_image(path)], loaded.preprocess)
    target = gmar.TextTarget(loaded.model, loaded.extras["tokenizer"], prompt)
    return gmar.explain(loaded.model, batch, method, target=target).heatmap[0].numpy()


def test_one_overlay_per_prompt_and_method(pictures, tmp_path, monkeypatch):
    titles = []
    grid = viz.method_grid

    def spy(images, explanations, row_titles=None, column_titles=None, **kwargs):
        titles.append((list(row_titles), {m: list(t) for m, t in column_titles.items()}, images.shape[0]))
        return grid(images, explanations, row_titles=row_titles, column_titles=column_titles, **kwargs)

    monkeypatch.setattr(viz, "method_grid", spy)
    out = tmp_path / "out"
    argv = [str(p) for p in pictures]
    assert run(*argv, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--method", "legrad,gmar", "--out", str(out),
               "--save-maps") == 0  # fmt: skip

    for name in ("room.png", "garden.png"):
        assert (out / f"{name}.png").is_file()
        for slug in ("a-photo-of-a-cat", "a-remote-control"):
            assert (out / f"{name}_{slug}_gmar_heads.png").is_file()
    # One figure per image, a row per prompt, each overlay labelled with its prompt.
    assert len(titles) == 2
    for rows, columns, count in titles:
        assert count == 2
        assert rows == [f'"{p}"' for p in PROMPTS]
        for method in ("legrad", "gmar"):
            assert [t.split(" (")[0] for t in columns[method]] == [f"{method}: {p}" for p in PROMPTS]
    # Each saved map is the library's map for that image and that prompt (not another prompt's).
    for path in pictures:
        for prompt, slug in zip(PROMPTS, ("a-photo-of-a-cat", "a-remote-control"), strict=True):
            for method in ("legrad", "gmar"):
                saved = np.load(out / f"{path.name}_{slug}_{method}.npy")
                np.testing.assert_allclose(saved, expected_map(path, prompt, method), **FLOAT32)
    cat, remote = (np.load(out / f"room.png_{s}_legrad.npy") for s in ("a-photo-of-a-cat", "a-remote-control"))
    assert not np.allclose(cat, remote), "the prompt must drive the map"


def test_head_weights_per_prompt_for_every_method_that_has_them(pictures, tmp_path):
    out = tmp_path / "heads"
    assert run(str(pictures[0]), "--prompt", "a cat", "--prompt", "a dog", "--method", "gmar_gae,rollout",
               "--out", str(out)) == 0  # fmt: skip
    name = pictures[0].name
    assert sorted(p.name for p in out.glob("*.png")) == [
        f"{name}.png",
        f"{name}_a-cat_gmar_gae_heads.png",
        f"{name}_a-dog_gmar_gae_heads.png",
    ]


def test_one_prompt_batches_images(pictures, tmp_path):
    out = tmp_path / "one"
    argv = [str(p) for p in pictures]
    assert run(*argv, "--prompt", "a dog", "--method", "gradcam", "--batch-size", "2", "--out", str(out),
               "--save-maps") == 0  # fmt: skip
    for path in pictures:
        saved = np.load(out / f"{path.name}_a-dog_gradcam.npy")
        np.testing.assert_allclose(saved, expected_map(path, "a dog", "gradcam"), **FLOAT32)


def test_prompts_with_the_same_file_name_do_not_overwrite(pictures, tmp_path):
    out = tmp_path / "same"
    assert run(str(pictures[1]), "--prompt", "A cat!", "--prompt", "a cat", "--method", "legrad", "--out", str(out),
               "--save-maps") == 0  # fmt: skip
    first, second = np.load(out / "garden.png_a-cat_legrad.npy"), np.load(out / "garden.png_a-cat-2_legrad.npy")
    np.testing.assert_allclose(first, expected_map(pictures[1], "A cat!", "legrad"), **FLOAT32)
    np.testing.assert_allclose(second, expected_map(pictures[1], "a cat", "legrad"), **FLOAT32)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give what to explain with --prompt"),
        (["--prompt", "a cat", "--target", "3"], "CLIP models are explained with --prompt"),
        (["--prompt", "a cat", "--prompt", " "], "prompt 1 is empty: give the text to explain"),
    ],
)
def test_clip_argument_errors(pictures, tmp_path, capsys, extra, message):
    assert run(str(pictures[0]), "--out", str(tmp_path / "x"), *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_prompt_on_a_classifier_is_refused(pictures, tmp_path, capsys):
    code = main(["explain", str(pictures[0]), "--model", "timm:test_vit", "--random-init", "--prompt", "a cat",
                 "--out", str(tmp_path / "y")])  # fmt: skip
    assert code == 2
    assert "--prompt is for CLIP models" in capsys.readouterr().err


def test_text_target_matches_the_cli_tokenizer():
    """The loader hands out OpenCLIP's tokenizer for the architecture, which TextTarget uses as is."""
    loaded = gmar.load_model(f"openclip:{ARCH}", pretrained=False)
    tokens = loaded.extras["tokenizer"](PROMPTS)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    target = gmar.TextTarget(loaded.model, loaded.extras["tokenizer"], PROMPTS)
    with torch.no_grad():
        own = torch.nn.functional.normalize(loaded.model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(target.embeddings, own)
