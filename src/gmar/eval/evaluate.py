"""The evaluation harness: explain a dataset with several methods, score every map, store every
number per image in SQLite, and write the tables and plots.

The unit of work is an *item*: one image and one target (for the scenes, one item per object
present; elsewhere the image's predicted class). Each ``(item, method)`` is stored in one
transaction with a ``done`` mark, so a killed run started again with the same arguments skips
what is stored and loses nothing. Under ``torchrun`` every process takes the items whose index
modulo the world size is its rank, all write to the same database, and rank 0 writes the report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sqlite3
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from gmar.adapters import get_adapter
from gmar.errors import GmarError
from gmar.eval import metrics as M
from gmar.methods import explain
from gmar.outputs import OutputFolder
from gmar.preprocess import IMAGE_SUFFIXES, PreprocessConfig, load_image, preprocess, resize_and_crop
from gmar.progress import Progress, message

#: metric groups as they are selected (``--metrics``) and plotted
GROUPS = {
    "faithfulness": ["deletion_auc", "insertion_auc", "perturbation_positive", "perturbation_negative"],
    "localisation": [
        "pointing_game",
        "energy_pointing_game",
        "pixel_auroc",
        "pixel_ap",
        "segmentation_pixel_accuracy",
        "segmentation_miou",
    ],
    "discrimination": ["class_discrimination"],
    "sanity": ["sanity_spearman"],
    "head_ablation": ["head_ablation_auc"],
    "model_check": ["removal_own_drops_most", "removal_own_drop", "removal_other_drop"],
}
#: ``--metrics`` names -> the metrics they produce
SELECTORS = {
    "deletion": ["deletion_auc"],
    "insertion": ["insertion_auc"],
    "perturbation": ["perturbation_positive", "perturbation_negative"],
    "pointing": ["pointing_game"],
    "energy": ["energy_pointing_game"],
    "auroc": ["pixel_auroc", "pixel_ap"],
    "segmentation": ["segmentation_pixel_accuracy", "segmentation_miou"],
    "discrimination": ["class_discrimination"],
    "sanity": ["sanity_spearman"],
    "head_ablation": ["head_ablation_auc"],
    "model_check": GROUPS["model_check"],
}
#: the head rankings of the head-ablation test: GMAR's paper weights, Taylor scores (``GMAR(head_score=
#: "taylor")``), ``gmar_gae``'s head scores, the measured single-knock-out order (the oracle a score
#: is judged by), a random order and GMAR's reversed
RANKINGS = ("gmar", "taylor", "gmar_gae", "oracle", "random", "reverse")
#: the unit under which the model check's results are stored (it scores the model, not a method)
MODEL_CHECK = "model_check"
#: below this rate of removals that drop the own class most, the report warns
MODEL_CHECK_WARNING = 0.8


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


@dataclass
class Settings:
    """Everything that changes the numbers; stored with the results, checked on resume."""

    model: str
    data: str
    methods: list[str]
    metrics: list[str]
    limit: int | None = None
    steps: int = 20
    baseline: float = 0.0
    blur_sigma: float = 5.0
    tolerance: float | None = None
    sanity_items: int = 16
    seed: int = 0
    multi_label: bool = False
    extra: dict = field(default_factory=dict)
    #: :func:`weights_digest` of the model; :func:`evaluate` fills it in, so a changed checkpoint is never resumed
    weights: str = ""


# ------------------------------------------------------------------------------------------------ data


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
            picture = load_image(path)
            image = preprocess(picture, config)[0]
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


# ----------------------------------------------------------------------------------------------- store


#: ``PRAGMA application_id`` of gmar's results databases (the bytes "gmar")
APPLICATION_ID = int.from_bytes(b"gmar", "big")
#: the layout of the results database, stored in ``meta`` as ``schema``; 1 was the unmarked one
SCHEMA_VERSION = 2
#: gmar's tables and their columns (those of version 1, which had no mark, too)
TABLES = {
    "meta": ("key", "value"),
    "scores": ("item", "method", "metric", "value"),
    "curves": ("item", "method", "curve", "value"),
    "done": ("item", "method"),
}


class Store:
    """The per-item results in ``results.sqlite``; safe for several processes.

    The database is marked as gmar's (``PRAGMA application_id`` :data:`APPLICATION_ID` and the
    schema version in ``meta``). One that is not, and does not hold exactly gmar's tables and
    columns (as the previous version wrote them), is refused before anything in it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        existed = path.is_file() and path.stat().st_size > 0
        try:
            self.db = sqlite3.connect(path, timeout=120)
        except sqlite3.Error as error:
            raise GmarError(f"cannot use {path} ({error}); use another --out") from None
        try:
            self._open(existed)
        except GmarError:
            self.db.close()
            raise
        except sqlite3.DatabaseError as error:
            self.db.close()
            if isinstance(error, sqlite3.OperationalError):  # locked, unwritable, no space: not damage
                if "locked" in str(error):
                    raise GmarError(f"{path} stayed locked by another process for 2 minutes; try again later") from None
                raise GmarError(f"cannot use {path} ({error}); use another --out") from None
            raise GmarError(
                f"{path} is damaged ({error}); gmar leaves it as it is: move it away or use another --out"
            ) from None

    def _open(self, existed: bool) -> None:
        if existed:  # read only: a database that is not gmar's, or damaged, is left exactly as it is
            self._check_ours()
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:  # a damaged page is found now, not halfway through a run
                raise sqlite3.DatabaseError("; ".join(problems))
        # Switching to WAL can fail at once with "database is locked" while another process does
        # the same (SQLite returns busy there without waiting): try again for as long as the timeout.
        deadline = time.monotonic() + 120
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        marked = self.db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        # A database already marked is not written to here (a refused resume leaves it byte for byte).
        mark = "" if marked else f"INSERT OR REPLACE INTO meta VALUES ('schema', '{SCHEMA_VERSION}');"
        mark += "" if marked else f"PRAGMA application_id = {APPLICATION_ID};"
        self.db.executescript(
            f"""
            BEGIN IMMEDIATE;
            CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS scores(item TEXT, method TEXT, metric TEXT, value REAL,
                                              PRIMARY KEY(item, method, metric));
            CREATE TABLE IF NOT EXISTS curves(item TEXT, method TEXT, curve TEXT, value TEXT,
                                              PRIMARY KEY(item, method, curve));
            CREATE TABLE IF NOT EXISTS done(item TEXT, method TEXT, PRIMARY KEY(item, method));
            {mark}
            COMMIT;
            """
        )

    def _check_ours(self) -> None:
        """Refuse a database gmar did not write (one line: what it holds, what to do)."""
        application = self.db.execute("PRAGMA application_id").fetchone()[0]
        tables = {
            name: tuple(row[1] for row in self.db.execute(f"PRAGMA table_info('{name}')"))
            for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if not name.startswith("sqlite_")
        }
        if application == APPLICATION_ID:
            return
        if application != 0:
            found = f"the database of another program (application id {application})"
        elif all(TABLES.get(name) == columns for name, columns in tables.items()):
            return  # empty, or gmar's tables as the previous version wrote them
        else:
            described = ", ".join(
                name if TABLES.get(name) is None else f"{name}({', '.join(columns)})"
                for name, columns in sorted(tables.items())
                if TABLES.get(name) != columns
            )
            found = f"an SQLite database with tables gmar does not write: {described}"
        raise GmarError(
            f"{self.path} is {found}, not written by gmar; gmar leaves it alone: move it away or use another --out"
        )

    def check_settings(self, settings: Settings) -> None:
        """Record the settings of a new run, or refuse to mix results of different runs."""
        current = json.dumps(asdict(settings), sort_keys=True)
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('settings', ?)", (current,))
        stored = self.db.execute("SELECT value FROM meta WHERE key='settings'").fetchone()[0]
        if stored != current:
            old, new = json.loads(stored), json.loads(current)
            differ = ", ".join(k for k in new if old.get(k) != new.get(k))
            if old.get("weights") != new.get("weights"):
                differ = differ.replace("weights", "weights: the model's weights are not those it was run with")
            raise GmarError(
                f"{self.path} holds results of a run with other settings ({differ}); use another --out or delete it"
            )

    def set_meta(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def done(self) -> set[tuple[str, str]]:
        return set(self.db.execute("SELECT item, method FROM done"))

    def done_units(self, item: str) -> set[str]:
        """The units (methods, the model check) stored for ``item``."""
        return {row[0] for row in self.db.execute("SELECT method FROM done WHERE item=?", (item,))}

    def forget_other_contents(self, key: str) -> None:
        """Delete the results of items with ``key``'s name (``name@digest``) but another digest (a file
        replaced under its name), and those under the bare name (the previous version's key for the
        file). Keys without a digest (scenes) are left alone."""
        name, at, _ = key.rpartition("@")
        if not at:
            return
        low, high = f"{name}@", f"{name}A"  # "A" follows "@": every "name@..." lies in between
        with self.db:  # (the length: not "name@other-name@digest", another file's key)
            for table in ("scores", "curves", "done"):
                self.db.execute(
                    f"DELETE FROM {table} WHERE item >= ? AND item < ? AND length(item) = ? AND item != ?",
                    (low, high, len(key), key),
                )
                self.db.execute(f"DELETE FROM {table} WHERE item = ?", (name,))

    def write(self, item: str, method: str, scores: dict[str, float], curves: dict[str, list[float]]) -> None:
        with self.db:  # one transaction: the results and the done mark land together or not at all
            self.db.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                [(item, method, k, None if v != v else float(v)) for k, v in scores.items()],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO curves VALUES (?, ?, ?, ?)",
                [(item, method, k, json.dumps([round(float(x), 6) for x in v])) for k, v in curves.items()],
            )
            self.db.execute("INSERT OR REPLACE INTO done VALUES (?, ?)", (item, method))

    def scores(self) -> list[tuple[str, str, str, float | None]]:
        return list(self.db.execute("SELECT item, method, metric, value FROM scores ORDER BY item, method, metric"))

    def curves(self) -> list[tuple[str, str, str, list[float]]]:
        return [(i, m, c, json.loads(v)) for i, m, c, v in self.db.execute("SELECT * FROM curves ORDER BY item")]

    def close(self) -> None:
        self.db.close()


# -------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    items: Sequence[Item | ImageFile | ImageNetSegImage],
    settings: Settings,
    out: Path,
    batch_size: int = 16,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    after_batch: Callable[[], None] | None = None,
) -> Store:
    """Explain and score ``items`` (this process's share of them), storing as it goes.

    ``items`` are decoded :class:`Item` or undecoded entries (:func:`image_files`,
    :func:`imagenet_seg_images`): each process takes those whose index modulo ``world`` is its
    ``rank``, skips those already stored without decoding them (their key comes from the file's
    bytes), and decodes, explains, scores and stores the rest a batch at a time, on the model's
    device; memory holds one batch. An entry that cannot be read is reported on one line and skipped.

    The store is keyed by ``settings`` and by :func:`weights_digest` of ``model``: a folder holding
    another run's results, or results of other weights, is refused.
    """
    adapter = get_adapter(model)
    if not adapter.is_classifier:
        raise GmarError(
            f"gmar evaluate scores classifiers, and {type(model).__name__} returns an embedding; score its maps with "
            "gmar.eval.metrics and a callable target (Scorer(model, target=...)) instead"
        )
    settings = replace(settings, weights=weights_digest(model))
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "results.sqlite")
    try:
        store.check_settings(settings)
    except GmarError:
        store.close()
        raise
    units = _units(settings)
    mine = [(index, entry) for index, entry in enumerate(items) if index % world == rank]
    scorer = M.Scorer(model, multi_label=settings.multi_label, batch_size=64)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if "head_ablation_auc" in settings.metrics and "gmar" in settings.methods and not _can_switch_heads(adapter):
        print(
            f"gmar: note: {type(model).__name__}'s heads cannot be switched off one by one; head ablation is skipped",
            file=sys.stderr,
        )
        settings = replace(settings, metrics=[m for m in settings.metrics if m != "head_ablation_auc"])
    if "sanity_spearman" in settings.metrics:
        labels = [label for label, _ in M.cascading_randomisation_steps(model)]
        store.set_meta("sanity_steps", json.dumps(labels))
    bar = Progress(len(mine), "evaluating", progress and rank == 0, unit="items")

    def pending_batches():
        """Batches of this process's entries still to do, as ``(index, entry, units done)``; entries
        already done, and unreadable ones, advance the bar here."""
        batch = []
        for index, entry in mine:
            key = entry.key
            finished = store.done_units(key) if key is not None else set(units)
            if all(unit in finished for unit in units):
                bar.update(advance=1)
                continue
            batch.append((index, entry, finished))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    for pending in pending_batches():
        decoded = [(index, entry.load(), finished) for index, entry, finished in pending]
        ready = [(index, item, finished) for index, item, finished in decoded if item is not None]
        if ready:
            _evaluate_batch(model, scorer, adapter, ready, settings, store, device)
        bar.update(advance=len(pending))
        del decoded, ready  # the batch's images are dropped before the next is decoded
        if after_batch is not None:
            after_batch()
    bar.close()
    return store


def _can_switch_heads(adapter) -> bool:
    from gmar.errors import UnsupportedModelError

    try:
        M.head_counts(adapter)
    except UnsupportedModelError:
        return False
    return True


def _evaluate_batch(model, scorer, adapter, ready, settings: Settings, store: Store, device) -> None:
    """Explain, score and store one batch: ``ready`` holds ``(index, item, units already done)``."""
    chunk = [item for _, item, _ in ready]
    done = {(item.key, unit) for _, item, finished in ready for unit in finished}
    for item in chunk:
        if not any(key == item.key for key, _ in done):
            store.forget_other_contents(item.key)  # this name's earlier content, if the file was replaced
    images = torch.stack([item.image for item in chunk]).to(device)
    targets = _targets(scorer, images, chunk)
    # The methods no item of the chunk has yet are explained in one call, sharing their pass.
    whole = [m for m in settings.methods if all((item.key, m) not in done for item in chunk)]
    shared = explain(model, images, whole, target=targets) if whole else {}
    # Their perturbation curves too: each perturbed image that several curves share is scored once.
    curves = _faithfulness(scorer, images, targets, [shared[m].heatmap for m in whole], settings)
    for method in settings.methods:
        pending = [i for i, item in enumerate(chunk) if (item.key, method) not in done]
        if not pending:
            continue
        sub = [chunk[i] for i in pending]
        explanation = (
            shared[method] if method in shared else explain(model, images[pending], method, target=targets[pending])
        )
        if method in shared:
            position, faithful = whole.index(method), curves
        else:
            position = 0
            faithful = _faithfulness(scorer, images[pending], targets[pending], [explanation.heatmap], settings)
        faithful = {k: (auc[position], curve[position]) for k, (auc, curve) in faithful.items()}
        results = _score_method(explanation.heatmap, sub, settings, faithful)
        if method == "gmar" and "head_ablation_auc" in settings.metrics:
            keys = [item.key for item in sub]
            rankings = _head_rankings(
                model, scorer, adapter, images[pending], targets[pending], explanation, keys, settings
            )
            _add_head_ablation(results, scorer, adapter, images[pending], targets[pending], rankings)
        if "sanity_spearman" in settings.metrics:
            # the first --sanity-items entries of the data, whatever process or batch they fall in
            wanted = [i for i, position in enumerate(pending) if ready[position][0] < settings.sanity_items]
            if wanted:
                _add_sanity(results, model, method, images[pending], targets[pending], wanted, settings)
        for i, item in enumerate(sub):
            store.write(item.key, method, results[i][0], results[i][1])
    if MODEL_CHECK in _units(settings):
        pending = [i for i, item in enumerate(chunk) if (item.key, MODEL_CHECK) not in done]
        sub = [chunk[i] for i in pending]
        for item, scores in zip(sub, _model_check(scorer, images[pending], targets[pending], sub), strict=True):
            store.write(item.key, MODEL_CHECK, scores, {})


def weights_digest(model: nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over the model's state dict (parameters and persistent
    buffers): each entry's name, dtype, shape and bytes, in order. Equal weights give equal digests."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _units(settings: Settings) -> list[str]:
    """What is stored per item: each method's scores, and the model check's when selected."""
    check = any(metric in GROUPS["model_check"] for metric in settings.metrics)
    return [*settings.methods, *([MODEL_CHECK] if check else [])]


def _model_check(scorer, images, targets, items) -> list[dict[str, float]]:
    """The model check's scores of ``items`` (of ``images``, ``targets``); none for an item without
    a re-rendered image."""
    results: list[dict[str, float]] = [{} for _ in items]
    able = [i for i, item in enumerate(items) if item.removed is not None]
    if not able:
        return results
    removed = torch.stack([items[i].removed for i in able]).to(images.device)
    others = [items[i].other_classes for i in able]
    own, other, most = M.object_removal(scorer, images[able], removed, targets[able], others)
    for k, position in enumerate(able):
        results[position] = {
            "removal_own_drop": float(own[k]),
            "removal_other_drop": float(other[k]),
            "removal_own_drops_most": float(most[k]),
        }
    return results


def _targets(scorer: M.Scorer, images: torch.Tensor, chunk: Sequence[Item]) -> torch.Tensor:
    """The explained classes: the item's own, or the model's prediction."""
    targets = [item.target for item in chunk]
    if any(t is None for t in targets):
        predicted = scorer.logits(images).argmax(dim=1)  # the adapter's logits, whatever the model returns
        targets = [int(p) if t is None else t for t, p in zip(targets, predicted, strict=True)]
    return torch.tensor(targets, dtype=torch.long)


#: the stored metric of each faithfulness protocol, and the name of its stored curve (None: not stored)
PROTOCOLS = {
    "deletion": ("deletion_auc", "deletion"),
    "insertion": ("insertion_auc", "insertion"),
    "perturbation_positive": ("perturbation_positive", None),
    "perturbation_negative": ("perturbation_negative", None),
}


def _faithfulness(scorer, images, targets, heatmaps: list[torch.Tensor], settings) -> dict:
    """The selected faithfulness protocols of several maps ``(B, H, W)`` of ``images`` at once
    (:func:`gmar.eval.metrics.faithfulness`): per protocol ``(auc, curve)`` with a leading map axis."""
    wanted = [p for p, (metric, _) in PROTOCOLS.items() if metric in settings.metrics]
    if not heatmaps or not wanted:
        return {}
    return M.faithfulness(
        scorer, images, torch.stack(heatmaps), targets, wanted, settings.steps, settings.baseline, settings.blur_sigma
    )


def _score_method(heatmaps, items, settings, faithful: dict) -> list[tuple[dict, dict]]:
    """Every selected metric of one method's ``heatmaps`` ``(B, H, W)`` of ``items``'s images, with
    its faithfulness protocols' ``(auc, curve)`` already measured in ``faithful``."""
    wanted = set(settings.metrics)
    results: list[tuple[dict, dict]] = [({}, {}) for _ in items]

    def put(name: str, values: torch.Tensor, rows: Sequence[int] | None = None) -> None:
        for row, value in zip(range(len(items)) if rows is None else rows, values.tolist(), strict=True):
            results[row][0][name] = value

    for protocol, (auc, curve) in faithful.items():
        metric, stored = PROTOCOLS[protocol]
        put(metric, auc)
        if stored is not None:
            for i, c in enumerate(curve.tolist()):
                results[i][1][stored] = c
    masked = [i for i, item in enumerate(items) if item.mask is not None]
    if masked:
        maps, masks = heatmaps[masked], torch.stack([items[i].mask for i in masked])
        if "pointing_game" in wanted:
            tolerance = settings.tolerance if settings.tolerance is not None else 15 * min(maps.shape[-2:]) / 224
            put("pointing_game", M.pointing_game(maps, masks, tolerance), masked)
        if "energy_pointing_game" in wanted:
            put("energy_pointing_game", M.energy_pointing_game(maps, masks), masked)
        if "pixel_auroc" in wanted:
            put("pixel_auroc", M.pixel_auroc(maps, masks), masked)
            put("pixel_ap", M.pixel_ap(maps, masks), masked)
        if "segmentation_miou" in wanted:
            accuracy, miou = M.segmentation(maps, masks)
            put("segmentation_pixel_accuracy", accuracy, masked)
            put("segmentation_miou", miou, masked)
    several = [i for i, item in enumerate(items) if item.mask is not None and item.others is not None]
    if several and "class_discrimination" in wanted:
        target_masks = torch.stack([items[i].mask for i in several])
        # Padded with empty masks, which the metric ignores.
        others = pad_sequence([items[i].others for i in several], batch_first=True)
        put("class_discrimination", M.class_discrimination(heatmaps[several], target_masks, others), several)
    return results


def _head_rankings(model, scorer, adapter, images, targets, explanation, keys, settings) -> dict[str, torch.Tensor]:
    """Every head ranking gmar offers, and the bounds it is judged by, ``(B, L*H)`` each (see :data:`RANKINGS`)."""
    paper = M.rank_heads(explanation.head_weights)
    # Each item's random ranking comes from its own key, whatever batch or process it falls in.
    generators = [torch.Generator().manual_seed(_seed(settings.seed, key)) for key in keys]
    # Taylor's and gmar_gae's scores come from one shared pass.
    scored = explain(model, images, ["gmar", "gmar_gae"], target=targets, options={"gmar": {"head_score": "taylor"}})
    return {
        "gmar": paper,
        "taylor": M.rank_heads(scored["gmar"].head_scores),
        "gmar_gae": M.rank_heads(scored["gmar_gae"].head_scores),
        "oracle": M.rank_heads(M.knockout_drops(scorer, adapter, images, targets)),
        "random": torch.stack([torch.randperm(paper.shape[1], generator=g) for g in generators]),
        "reverse": paper.flip(1),
    }


def _add_head_ablation(results, scorer, adapter, images, targets, rankings: dict[str, torch.Tensor]) -> None:
    for name, ranking in rankings.items():
        auc, curve = M.head_ablation(scorer, adapter, images, targets, ranking)
        for i in range(len(results)):
            results[i][0][f"head_ablation_auc[{name}]"] = float(auc[i])
            results[i][1][f"head_ablation[{name}]"] = curve[i].tolist()


def _seed(seed: int, key: str) -> int:
    return zlib.crc32(f"{seed}:{key}".encode())


def _add_sanity(results, model, method, images, targets, rows, settings) -> None:
    picked = images[rows]

    def heatmaps(net: nn.Module) -> torch.Tensor:
        return explain(net, picked, method, target=targets[rows]).heatmap

    steps = M.cascading_randomisation(model, heatmaps, seed=settings.seed)
    for position, row in enumerate(rows):
        values = [float(rho[position]) for _, rho in steps]
        clean = [v for v in values if v == v]
        results[row][0]["sanity_spearman"] = sum(clean) / len(clean) if clean else float("nan")
        results[row][1]["sanity"] = values


# ---------------------------------------------------------------------------------------------- report


#: The files :func:`report` may write; none of them replaces a file gmar did not write.
REPORT_FILES = (
    "results.csv",
    "results.md",
    *(f"{group}.png" for group in GROUPS if group != "model_check"),
    "deletion_insertion.png",
)


def report(store: Store, settings: Settings, out: Path) -> dict:
    """Write ``results.csv``, ``results.md`` and the plots; return the summary table."""
    table: dict[tuple[str, str], list[float]] = {}
    scores = store.scores()
    for _, method, metric, value in scores:
        if metric.startswith("head_ablation_auc["):
            method, metric = metric[len("head_ablation_auc[") : -1], "head_ablation_auc"
            method = f"heads:{method}"
        table.setdefault((method, metric), []).append(float("nan") if value is None else value)
    summary = {key: (*M.mean_ci(values), sum(v == v for v in values)) for key, values in table.items()}
    checks = GROUPS["model_check"]
    metrics_present = [
        m for group in GROUPS.values() for m in group if m not in checks and any(k[1] == m for k in summary)
    ]
    methods_present = [m for m in settings.methods if any(k[0] == m for k in summary)]
    outputs = OutputFolder(out)
    outputs.check(REPORT_FILES)  # before writing any: a report is written whole or not at all

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["method", "metric", "mean", "ci95", "n", "better"])
            for (method, metric), (mean, ci, n) in sorted(summary.items()):
                writer.writerow([method, metric, f"{mean:.6f}", f"{ci:.6f}", n, M.DIRECTION[metric]])

    markdown = _markdown(summary, methods_present, metrics_present, settings) + _model_check_section(summary, settings)
    paired = "".join(_paired(scores, methods_present, metrics_present, pair) for pair in PAIRS)
    paired += _paired_heads(scores)
    with outputs:  # the folder's list of outputs is folded when the report is written
        outputs.write("results.csv", write_csv)
        text = markdown + paired + _sanity_steps(store, methods_present)
        outputs.write("results.md", lambda path: path.write_text(text))
        _plots(store, summary, methods_present, outputs)
    return summary


def _markdown(summary, methods, metrics, settings: Settings) -> str:
    main = [m for m in metrics if m != "head_ablation_auc"]
    lines = [
        f"# gmar evaluate: {settings.model} on {settings.data}",
        "",
        "Mean over items with its 95 % confidence interval (± 1.96 standard errors); **bold**: the best",
        "method per metric (↑ higher is better, ↓ lower is better); n: items with a value.",
        "",
    ]
    if main:
        lines.append("| method | " + " | ".join(f"{m} {_arrow(m)}" for m in main) + " |")
        lines.append("|---|" + "---|" * len(main))
        best = {m: _best(summary, methods, m) for m in main}
        for method in methods:
            cells = []
            for metric in main:
                if (method, metric) not in summary:
                    cells.append("—")
                    continue
                mean, ci, n = summary[(method, metric)]
                text = f"{mean:.3f} ± {ci:.3f}" if ci == ci else f"{mean:.3f}"
                cells.append(f"**{text}**" if method in best[metric] else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        counts = {m: max((summary[(x, m)][2] for x in methods if (x, m) in summary), default=0) for m in main}
        lines += ["", "Items per metric: " + ", ".join(f"{m} {n}" for m, n in counts.items()) + "."]
    heads = [k for k in summary if k[1] == "head_ablation_auc"]
    if heads:
        lines += [
            "",
            "## Head-importance faithfulness",
            "",
            "Heads switched off one by one in the order of a ranking; AUC of the target's probability over the",
            "share removed (↓ lower: the ranking finds the heads that matter first).",
            "",
            "| ranking | head_ablation_auc ↓ | n |",
            "|---|---|---|",
        ]
        for name in RANKINGS:
            if (f"heads:{name}", "head_ablation_auc") in summary:
                mean, ci, n = summary[(f"heads:{name}", "head_ablation_auc")]
                lines.append(f"| {name} | {mean:.3f} ± {ci:.3f} | {n} |")
    return "\n".join(lines) + "\n"


def _model_check_section(summary, settings: Settings) -> str:
    """The model check as a markdown section, with a warning line when the model fails it; empty
    when it was not selected."""
    if not any(metric in GROUPS["model_check"] for metric in settings.metrics):
        return ""
    lines = ["", "## Model check: does removing an object lower its own class most?", ""]
    rate = summary.get((MODEL_CHECK, "removal_own_drops_most"))
    if rate is None or rate[2] == 0:
        lines.append(
            "Not measured: the check needs data that can re-render a scene without one of its objects and "
            "scenes with several objects (`--data scenes`)."
        )
        return "\n".join(lines) + "\n"
    lines += [
        "Each item of a scene with several objects, re-rendered without its object "
        "(`gmar.eval.scenes.Scenes.without`):",
        "the drop of each present class's logit. The localisation and class-discrimination scores above assume",
        "that the model finds each class on its own object; this measures it.",
        "",
        "| check | mean | n |",
        "|---|---|---|",
    ]
    names = {
        "removal_own_drops_most": "removed object's class drops most of the present classes (rate) ↑",
        "removal_own_drop": "drop of the removed object's class logit ↑",
        "removal_other_drop": "mean drop of the other present classes' logits (ideally about 0)",
    }
    for metric, label in names.items():
        mean, ci, n = summary[(MODEL_CHECK, metric)]
        lines.append(f"| {label} | {mean:.3f} ± {ci:.3f} | {n} |" if ci == ci else f"| {label} | {mean:.3f} | {n} |")
    lines.append("")
    lines.append(model_check_verdict(rate[0]))
    return "\n".join(lines) + "\n"


def model_check_verdict(rate: float) -> str:
    """One line on what the model check's rate means for the benchmark's localisation scores."""
    if rate < MODEL_CHECK_WARNING:
        return (
            f"**Warning:** removing an object lowered its own class most in only {rate:.1%} of the removals "
            f"(below {MODEL_CHECK_WARNING:.0%}): this model does not find each class on its own object in this "
            "data, so its maps cannot be scored as right or wrong by the objects' masks; read the localisation "
            "and class-discrimination columns as properties of this model, not of the methods."
        )
    return (
        f"Removing an object lowered its own class most in {rate:.1%} of the removals: the model finds each "
        "class on its own object, as the localisation scores assume."
    )


#: The pairs reported item by item when both were evaluated: the one GMAR's paper compares, and
#: the head-weighted GAE against GAE.
PAIRS = (("gmar", "rollout"), ("gmar_gae", "gae"))


def _paired(
    scores: list[tuple[str, str, str, float | None]],
    methods: list[str],
    metrics: list[str],
    pair: tuple[str, str] = PAIRS[0],
) -> str:
    """``pair[0]`` minus ``pair[1]`` per item (same items, so per-item noise cancels), as a markdown
    section; ``scores`` are the store's rows."""
    first, second = pair
    if first not in methods or second not in methods:
        return ""
    values: dict[str, dict[str, dict[str, float]]] = {}
    for item, method, metric, value in scores:
        if method in pair and value is not None and value == value:
            values.setdefault(metric, {}).setdefault(item, {})[method] = value
    rows = []
    for metric in metrics:
        differences = [v[first] - v[second] for v in values.get(metric, {}).values() if len(v) == 2]
        if len(differences) < 2:
            continue
        mean, ci = M.mean_ci(differences)
        gain = mean if M.DIRECTION[metric] == "higher" else -mean
        verdict = f"{first} better" if gain > ci else f"{second} better" if gain < -ci else "no clear difference"
        rows.append(f"| {metric} {_arrow(metric)} | {mean:+.4f} ± {ci:.4f} | {len(differences)} | {verdict} |")
    if not rows:
        return ""
    header = [
        "",
        f"## {first} against {second}, item by item",
        "",
        f"The mean of {first}'s score minus {second}'s on the same item, with its 95 % confidence interval;",
        "a difference is clear when the interval excludes 0.",
        "",
        f"| metric | {first} − {second} | n | verdict |",
        "|---|---|---|---|",
    ]
    return "\n".join(header + rows) + "\n"


def _paired_heads(scores: list[tuple[str, str, str, float | None]]) -> str:
    """Each head ranking's ablation AUC minus the oracle's and minus GMAR's, item by item, as a markdown section."""
    values: dict[str, dict[str, float]] = {}
    for item, _, metric, value in scores:
        if metric.startswith("head_ablation_auc[") and value is not None and value == value:
            values.setdefault(item, {})[metric[len("head_ablation_auc[") : -1]] = value

    def cell(name: str, other: str) -> str:
        differences = [v[name] - v[other] for v in values.values() if name in v and other in v]
        if len(differences) < 2 or name == other:
            return "—"
        mean, ci = M.mean_ci(differences)
        return f"{mean:+.3f} ± {ci:.3f}"

    present = [name for name in RANKINGS if any(name in v for v in values.values())]
    if "oracle" not in present or "gmar" not in present:
        return ""
    lines = [
        "",
        "## Head rankings against the oracle and GMAR, item by item",
        "",
        "Each ranking's head-ablation AUC minus the oracle's (the measured single-knock-out order) and minus",
        "GMAR's on the same item, with the 95 % confidence interval of the mean difference (↓ lower is better).",
        "",
        "| ranking | − oracle | − gmar |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {cell(name, 'oracle')} | {cell(name, 'gmar')} |" for name in present]
    return "\n".join(lines) + "\n"


def _sanity_steps(store: Store, methods: list[str]) -> str:
    """Mean Spearman correlation per randomisation step and method, as a markdown section."""
    labels = json.loads(store.meta("sanity_steps") or "[]")
    curves: dict[str, list[list[float]]] = {}
    for _, method, curve, values in store.curves():
        if curve == "sanity":
            curves.setdefault(method, []).append(values)
    if not labels or not curves:
        return ""
    lines = [
        "",
        "## Sanity: cascading randomisation, step by step",
        "",
        "Spearman correlation of the map with the original after randomising from the head down to each step",
        "(↓ lower: the map depends on what the model learned).",
        "",
        "| method | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for method in methods:
        if method in curves:
            means = np.nanmean(np.array(curves[method], dtype=float), axis=0)
            lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return "\n".join(lines) + "\n"


def _arrow(metric: str) -> str:
    return "↑" if M.DIRECTION[metric] == "higher" else "↓"


def _best(summary, methods, metric) -> set[str]:
    """The methods with the best mean (all of them when tied)."""
    values = {m: summary[(m, metric)][0] for m in methods if (m, metric) in summary}
    values = {m: v for m, v in values.items() if v == v}
    if not values:
        return set()
    best = max(values.values()) if M.DIRECTION[metric] == "higher" else min(values.values())
    return {m for m, v in values.items() if abs(v - best) <= 1e-12}


def _plots(store: Store, summary, methods, out: OutputFolder) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    for group, names in GROUPS.items():
        names = [n for n in names if any((m, n) in summary for m in methods)]
        if not names or group == "head_ablation":
            continue
        figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
        for axis, name in zip(axes[0], names, strict=True):
            present = [m for m in methods if (m, name) in summary]
            means = [summary[(m, name)][0] for m in present]
            errors = [0 if summary[(m, name)][1] != summary[(m, name)][1] else summary[(m, name)][1] for m in present]
            axis.bar(range(len(present)), means, yerr=errors, color="tab:blue", capsize=3)
            axis.set_xticks(range(len(present)), present, rotation=45, ha="right", fontsize=8)
            axis.set_title(f"{name} {_arrow(name)}", fontsize=9)
        figure.tight_layout()
        out.write(f"{group}.png", lambda path, figure=figure: figure.savefig(path, dpi=100))
        plt.close(figure)
    curves: dict[tuple[str, str], list[list[float]]] = {}
    for _, method, curve, values in store.curves():
        curves.setdefault((curve, method), []).append(values)
    kinds = [("deletion", "deletion (↓ area)"), ("insertion", "insertion (↑ area)")]
    if any(k[0] in dict(kinds) for k in curves):
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for axis, (kind, title) in zip(axes, kinds, strict=True):
            for method in methods:
                if (kind, method) in curves:
                    mean = np.mean(np.array(curves[(kind, method)]), axis=0)
                    axis.plot(np.linspace(0, 1, len(mean)), mean, label=method)
            axis.set_xlabel("fraction of pixels")
            axis.set_ylabel("target probability")
            axis.set_title(title, fontsize=9)
        axes[0].legend(fontsize=7)
        figure.tight_layout()
        out.write("deletion_insertion.png", lambda path, figure=figure: figure.savefig(path, dpi=100))
        plt.close(figure)
    ablations = {k[0]: v for k, v in curves.items() if k[0].startswith("head_ablation[")}
    if ablations:
        figure, axis = plt.subplots(figsize=(4.5, 3.5))
        for kind, values in ablations.items():
            mean = np.mean(np.array(values), axis=0)
            axis.plot(np.linspace(0, 1, len(mean)), mean, label=kind[len("head_ablation[") : -1])
        axis.set_xlabel("fraction of heads removed")
        axis.set_ylabel("target probability")
        axis.set_title("head ablation (↓ area)", fontsize=9)
        axis.legend(fontsize=7)
        figure.tight_layout()
        out.write("head_ablation.png", lambda path, figure=figure: figure.savefig(path, dpi=100))
        plt.close(figure)


# ----------------------------------------------------------------------------------------------- misc


def check_writable(out: Path) -> None:
    """Refuse, in one line and before any work, an ``--out`` gmar could not write into: a read-only
    file system, a folder without write permission, a path under a file. Creates nothing."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: where it points does not exist
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "" if existing == out else f" ({existing} is a file)"
        raise GmarError(f"--out {out} is not a folder{where}; choose another --out")
    writable = os.access(existing, os.W_OK | os.X_OK)
    database = out / "results.sqlite"
    if writable and database.exists():
        writable = os.access(database, os.R_OK | os.W_OK)
        existing = database
    if not writable:
        reason = "read-only file system" if _read_only(existing) else "no permission to write"
        raise GmarError(f"cannot write to --out {out}: {existing}: {reason}; choose a folder you can write to")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def select_metrics(spec: str) -> list[str]:
    """``all`` or comma-separated selector names (:data:`SELECTORS`) to metric names."""
    names = list(SELECTORS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in SELECTORS]
    if unknown or not names:
        raise GmarError(f"unknown metric(s) {', '.join(unknown) or spec!r}; choose from {', '.join(SELECTORS)}")
    return [metric for name in names for metric in SELECTORS[name]]


def distributed() -> tuple[int, int]:
    """``(rank, world size)``; initialises a gloo process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
