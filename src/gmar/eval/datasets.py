"""Where evaluate's items come from: the synthetic scenes, an image folder (with masks), the
ImageNet-Segmentation file; and the content keys an item is stored under.

An *item* is one image and one target (for the scenes, one item per object present; elsewhere the
image's predicted class). Folder and ImageNet-Segmentation items come undecoded (:class:`ImageFile`,
:class:`ImageNetSegImage`): their key is read from the bytes, and :func:`gmar.eval.harness.evaluate`
decodes them a batch at a time, never one already stored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gmar.errors import GmarError
from gmar.preprocess import IMAGE_SUFFIXES, PreprocessConfig, load_image, preprocess, resize_and_crop, warnings_of
from gmar.progress import message


@dataclass
class Item:
    """One image and what to explain in it."""

    key: str
    image: torch.Tensor  # (3, H, W) model input
    target: int | None = None  # None: the model's prediction
    mask: torch.Tensor | None = None  # (H, W) bool: the target's pixels
    others: torch.Tensor | None = None  # (K, H, W) bool: each other object's pixels (multi-object scenes)
    other_classes: tuple[int, ...] = ()  # the classes of ``others``, in order
    removed: torch.Tensor | None = None  # (3, H, W): the image without the target's object (scenes)

    def load(self) -> Item:
        """The item itself (a decoded item; :class:`ImageFile` is one still to decode)."""
        return self


def scene_items(limit: int | None, seed: int = 0, image_size: int = 64, removals: bool = True) -> list[Item]:
    """Test scenes, one item per object present; ``others`` holds the other objects' masks and,
    with ``removals``, ``removed`` the scene re-rendered without the item's object (scenes with
    several objects only: the model check compares the classes present)."""
    from gmar.eval.scenes import Scenes

    scenes = Scenes("test", limit if limit is not None else 500, seed=seed, image_size=image_size)
    items = []
    for scene in scenes:
        for cls in scene.classes:
            other_classes = tuple(c for c in scene.classes if c != cls)
            others = scene.masks[list(other_classes)] if other_classes else None
            removed = scenes.without(scene.index, cls).image if removals and other_classes else None
            key = f"scene{scene.index:05d}/c{cls}"
            items.append(Item(key, scene.image, cls, scene.masks[cls], others, other_classes, removed))
    return items


#: bytes of the content digest in an item's key (``name@`` and twice as many hex digits)
DIGEST_SIZE = 8


def content_digest(*contents: bytes) -> str:
    """The hex BLAKE2b digest (:data:`DIGEST_SIZE` bytes) of ``contents``, each length-prefixed."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for content in contents:
        digest.update(len(content).to_bytes(8, "little"))
        digest.update(content)
    return digest.hexdigest()


def content_key(name: str, *contents: bytes) -> str:
    """``name@digest``: an item's key, by its content (:func:`content_digest`), with its name to read it by.

    Only the image's bytes count for a folder's item without a mask (its key is then
    ``name@blake2b(bytes)``); a mask's bytes count too."""
    if len(contents) == 1:
        return f"{name}@{hashlib.blake2b(contents[0], digest_size=DIGEST_SIZE).hexdigest()}"
    return f"{name}@{content_digest(*contents)}"


def item_name(key: str) -> str:
    """The readable part of an item's key: the file name of ``name@digest``, a scene's key as it is."""
    return key.rpartition("@")[0] or key


class ImageFile:
    """One image of a folder, not decoded yet: :attr:`key` comes from the file's bytes (and its mask's),
    :meth:`load` decodes it. evaluate decodes a batch at a time, and never an item already done."""

    def __init__(self, path: Path, masks: Path | None, config: PreprocessConfig) -> None:
        self.path, self.masks, self.config = path, masks, config
        self._key: str | None = None
        self._read = False

    @property
    def mask_path(self) -> Path | None:
        if self.masks is None:
            return None
        found = sorted(p for p in self.masks.glob(_glob_escape(self.path.stem) + ".*") if _is_image(p))
        return found[0] if found else None

    @property
    def key(self) -> str | None:
        """``name@digest`` of the file's bytes (and its mask's, when it has one); None when the file
        cannot be read (reported on one line)."""
        if not self._read:
            self._read = True
            try:
                contents = [self.path.read_bytes()]
                mask = self.mask_path
                if mask is not None:
                    contents.append(mask.read_bytes())
            except OSError as error:
                message(f"gmar: skipped {self.path}: cannot be read ({error.strerror or error})")
            except MemoryError:
                message(f"gmar: skipped {self.path}: not enough memory to read it")
            else:
                self._key = content_key(self.path.name, *contents)
        return self._key

    def load(self) -> Item | None:
        """The decoded item, or None when the image or its mask cannot be used (reported on one line:
        unreadable, out of memory, a mask of another size)."""
        key = self.key
        if key is None:
            return None
        path, config = self.path, self.config
        try:
            with warnings_of(path) as named:
                picture = load_image(path)
                image = preprocess(picture, config)[0]
            for _, line in named:  # Pillow's "Corrupt EXIF data" and the like, naming the file
                message(f"gmar: {line}")
        except GmarError as error:
            message(f"gmar: skipped {error}")
            return None
        except MemoryError:
            message(f"gmar: skipped {path}: not enough memory to decode and resize it")
            return None
        mask = None
        if self.masks is not None:
            found = self.mask_path
            if found is None:
                message(f"gmar: no mask for {path.name} in {self.masks}; its localisation metrics are skipped")
            else:
                try:
                    drawn = load_image(found, background=(0, 0, 0))  # transparent: not the object
                except GmarError as error:
                    message(f"gmar: skipped {path.name}: its mask cannot be read ({error})")
                    return None
                except MemoryError:
                    message(f"gmar: skipped {path.name}: not enough memory to decode its mask")
                    return None
                if drawn.size != picture.size:
                    message(
                        f"gmar: skipped {path.name}: its mask {found} is {_pixels(drawn.size)} pixels but the "
                        f"image is {_pixels(picture.size)}; a mask must have its image's size"
                    )
                    return None
                mask = _mask_to_input(np.asarray(drawn.convert("L")) > 0, config)
        return Item(key, image, None, mask)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def image_files(folder: Path, masks: Path | None, config: PreprocessConfig, limit: int | None) -> list[ImageFile]:
    """The images of ``folder`` (sorted by name; the suffixes of :data:`gmar.preprocess.IMAGE_SUFFIXES`),
    the first ``limit``, undecoded (:class:`ImageFile`), each with the same-named mask of ``masks``
    when given (nonzero = foreground, resized and cropped like the image)."""
    if not folder.is_dir():
        raise GmarError(f"imagefolder: {folder} is not a folder")
    if masks is not None and not masks.is_dir():
        raise GmarError(f"--masks {masks} is not a folder; give the folder of masks named like the images")
    paths = sorted(p for p in folder.iterdir() if _is_image(p))[:limit]
    return [ImageFile(path, masks, config) for path in paths]


def folder_items(folder: Path, masks: Path | None, config: PreprocessConfig, limit: int | None) -> list[Item]:
    """:func:`image_files`, every one decoded at once (evaluate decodes them a batch at a time). An
    unreadable image, an unreadable mask and a mask whose pixel size is not its image's are reported
    on one line each and their item skipped."""
    items = [entry.load() for entry in image_files(folder, masks, config, limit)]
    return [item for item in items if item is not None]


def _pixels(size: tuple[int, int]) -> str:
    """A PIL ``(width, height)`` as ``"W×H"``."""
    return f"{size[0]}×{size[1]}"


class ImageNetSegImage:
    """One image of the ImageNet-Segmentation file, not decoded yet; keyed by its pixels and mask."""

    def __init__(self, source: _ImageNetSeg, index: int) -> None:
        self.source, self.index = source, index
        self._key: str | None = None
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        handle = self.source.handle()
        images, truths = handle["value/img"], handle["value/gt"]
        pixels = np.array(handle[images[self.index, 0]])
        truth = np.array(handle[truths[self.index, 0]])
        return pixels, truth

    @property
    def key(self) -> str:
        """``imagenet-seg/NNNNN@digest`` of the stored image and mask arrays."""
        if self._key is None:
            pixels, truth = self._read()
            self._key = content_key(
                f"imagenet-seg/{self.index:05d}", str(pixels.shape).encode(), pixels.tobytes(), truth.tobytes()
            )
        return self._key

    def load(self) -> Item:
        from PIL import Image

        key = self.key
        pixels, truth = self._read()
        image = preprocess(Image.fromarray(pixels.transpose(2, 1, 0).astype(np.uint8)), self.source.config)[0]
        mask = _mask_to_input(truth.transpose(1, 0) > 0, self.source.config)
        return Item(key, image, None, mask)


class _ImageNetSeg:
    """The open file, shared by its images (opened on first use)."""

    def __init__(self, file: Path, config: PreprocessConfig) -> None:
        self.file, self.config = file, config
        self._handle = None

    def handle(self):
        if self._handle is None:
            import h5py

            self._handle = h5py.File(self.file, "r")
        return self._handle


def imagenet_seg_images(file: Path, config: PreprocessConfig, limit: int | None) -> list[ImageNetSegImage]:
    """The ImageNet-Segmentation benchmark (``gtsegs_ijcv.mat``, MATLAB v7.3 / HDF5), undecoded:
    datasets ``value/img`` and ``value/gt`` hold one object reference per image; the referenced
    arrays are stored transposed (``(3, W, H)`` uint8 and ``(W, H)``). The target is the predicted
    class. Each image's key holds a digest of its arrays."""
    try:
        import h5py
    except ImportError:
        raise GmarError("reading ImageNet-Segmentation needs h5py: pip install 'gmar[eval]'") from None

    if not file.is_file():
        raise GmarError(f"--imagenet-seg: no such file {file}")
    with h5py.File(file, "r") as handle:
        total = handle["value/img"].shape[0]
    count = total if limit is None else min(limit, total)
    source = _ImageNetSeg(file, config)
    return [ImageNetSegImage(source, index) for index in range(count)]


def imagenet_seg_items(file: Path, config: PreprocessConfig, limit: int | None) -> list[Item]:
    """:func:`imagenet_seg_images`, every one decoded at once."""
    return [entry.load() for entry in imagenet_seg_images(file, config, limit)]


def _mask_to_input(mask: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    from PIL import Image

    nearest = PreprocessConfig(config.input_size, config.mean, config.std, "nearest", config.crop_pct)
    resized = resize_and_crop(Image.fromarray(mask.astype(np.uint8) * 255), nearest)
    return torch.from_numpy(np.asarray(resized) > 127)
