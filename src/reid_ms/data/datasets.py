"""Readers for the published re-ID data sets, each from its own folder layout.

``load_dataset(name, root)`` returns the training, query and gallery lists of :class:`ReidSample`.
The conventions are TransReID's (and CLIP-ReID's, MambaPro's for RGBNT201): junk images (person -1)
are dropped from every split; cameras are 0-based; training ids are relabelled ``0..P-1``, here in
sorted order of the original ids (the originals enumerate a Python set, whose order is not promised);
query and gallery keep their original ids. Data sets without viewpoint labels give every image view 0.

``root`` is the data set's own folder (the one holding ``bounding_box_train`` for Market-1501), or a
folder holding it under its usual name (``root/Market-1501-v15.09.15``, ``root/market1501``, ...).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import torch
from torch.utils.data import Dataset

from reid_ms.data.folder import _MARKET_NAME, JUNK_PID, list_images, read_image
from reid_ms.errors import InputError

__all__ = ["ReidSample", "ReidDataset", "ImageDataset", "load_dataset", "DATASETS"]

log = logging.getLogger(__name__)

SamplePath = Union[Path, Mapping[str, Path]]


class ReidSample(NamedTuple):
    """One training or test image: ``path`` (for multi-modal sets a dict modality -> file), ids."""

    path: SamplePath
    pid: int
    camid: int
    viewid: int


@dataclass(frozen=True)
class ReidDataset:
    """A data set's three splits, as :func:`load_dataset` reads them.

    ``num_train_pids`` is the number of training identities (the classifier's width);
    ``num_train_cams`` / ``num_train_views`` are 1 + the largest camera / view id in any split, the rows
    a camera or view embedding needs (on the published sets every camera appears in training, so this is
    the originals' count of training cameras).
    """

    name: str
    root: Path
    train: list[ReidSample]
    query: list[ReidSample]
    gallery: list[ReidSample]
    modalities: tuple[str, ...] = ()

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def num_train_cams(self) -> int:
        return 1 + max(s.camid for s in self.train + self.query + self.gallery)

    @property
    def num_train_views(self) -> int:
        return 1 + max(s.viewid for s in self.train + self.query + self.gallery)

    def __repr__(self) -> str:
        return (f"ReidDataset({self.name!r}, root={str(self.root)!r}, train={len(self.train)} images of "
                f"{self.num_train_pids} ids, query={len(self.query)}, gallery={len(self.gallery)}, "
                f"cams={self.num_train_cams}, views={self.num_train_views})")


class ImageDataset(Dataset):
    """Samples as tensors for training: item ``i`` is ``(image, pid, camid, viewid)``.

    ``image`` is ``transform(PIL RGB image)``, a ``[3, H, W]`` tensor with the usual transforms; for a
    multi-modal sample it is a dict modality -> tensor, each modality transformed on its own draw of the
    random augmentation (as MambaPro does), which the default collate turns into a dict of ``[B, 3, H, W]``.
    """

    def __init__(self, samples: Sequence[ReidSample], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | dict[str, torch.Tensor], int, int, int]:
        path, pid, camid, viewid = self.samples[index]
        if isinstance(path, Mapping):
            image = {m: self.transform(read_image(p)) for m, p in path.items()}
        else:
            image = self.transform(read_image(path))
        return image, pid, camid, viewid


# --- layouts --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    title: str
    folder_names: tuple[str, ...]   # what the data set's folder is usually called, under ``root``
    marker: str                     # a sub-path of the data set's folder that identifies it
    expected: str                   # the layout, for error messages


_LAYOUTS = {
    "market1501": _Layout("Market-1501", ("Market-1501-v15.09.15", "market1501", "Market-1501"),
                          "bounding_box_train", "bounding_box_train/, query/, bounding_box_test/"),
    "dukemtmc": _Layout("DukeMTMC-reID", ("DukeMTMC-reID", "dukemtmcreid", "dukemtmc"),
                        "bounding_box_train", "bounding_box_train/, query/, bounding_box_test/"),
    "occ_duke": _Layout("Occluded-Duke", ("Occluded_Duke", "occluded_duke", "Occluded-Duke"),
                        "bounding_box_train", "bounding_box_train/, query/, bounding_box_test/"),
    "msmt17": _Layout("MSMT17", ("MSMT17", "MSMT17_V1", "msmt17"), "list_train.txt",
                      "train/, test/, list_train.txt, list_val.txt, list_query.txt, list_gallery.txt"),
    "veri": _Layout("VeRi-776", ("VeRi", "VeRi-776", "veri"), "image_train",
                    "image_train/, image_query/, image_test/ (optionally keypoint_train.txt, keypoint_test.txt)"),
    "rgbnt201": _Layout("RGBNT201", ("RGBNT201", "rgbnt201"), "train_171",
                        "train_171/{RGB,NI,TI}/, test/{RGB,NI,TI}/"),
    "folder": _Layout("Market-1501-named", (), "bounding_box_train",
                      "bounding_box_train/, query/, bounding_box_test/ of '<id>_c<camera>...' crops"),
}

DATASETS = tuple(_LAYOUTS)

# cameras as numbered in each data set's file names (1-based), as the originals assert them
_MAX_CAMERA = {"market1501": 6, "dukemtmc": 8, "occ_duke": 8, "msmt17": 15, "veri": 20, "rgbnt201": 4}

# RGBNT201's modality folders, by the names the multi-modal models take
_RGBNT_FOLDERS = {"rgb": "RGB", "nir": "NI", "tir": "TI"}
_MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")

_RGBNT_NAME = re.compile(r"^(\d+)_cam(\d)")              # 000001_cam1_0_00.jpg
_MSMT_CAM = re.compile(r"^\d+_\d+_(\d+)_")              # 0000_000_01_0303morning_0015_0.jpg


def _dataset_dir(name: str, root: Path) -> Path:
    layout = _LAYOUTS[name]
    if (root / layout.marker).exists():
        return root
    for folder in layout.folder_names:
        if (root / folder / layout.marker).exists():
            return root / folder
    if not root.is_dir():
        raise InputError(f"{layout.title} root {str(root)!r} does not exist or is not a directory")
    inside = " or ".join(repr(str(root / f)) for f in layout.folder_names)
    raise InputError(f"{str(root)!r} is not a {layout.title} folder: expected {str(root / layout.marker)!r} "
                     f"({layout.title} layout: {layout.expected})" + (f", or that layout inside {inside}" if inside else ""))


def _require_dir(path: Path, layout: _Layout) -> Path:
    if not path.is_dir():
        raise InputError(f"{layout.title}: expected the folder {str(path)!r} ({layout.title} layout: {layout.expected})")
    return path


def _check_camera(name: str, camera: int, where: str) -> int:
    """The 0-based camera of a 1-based camera number, checked against the data set's cameras."""
    top = _MAX_CAMERA.get(name)
    if camera < 1:
        raise InputError(f"{where}: camera numbers in file names start at 1, got {camera}")
    if top is not None and camera > top:
        raise InputError(f"{where}: camera {camera} is outside {_LAYOUTS[name].title}'s cameras 1-{top}; "
                         f"is this the right data set?")
    return camera - 1


def _relabel(samples: list[ReidSample]) -> list[ReidSample]:
    mapping = {pid: label for label, pid in enumerate(sorted({s.pid for s in samples}))}
    return [s._replace(pid=mapping[s.pid]) for s in samples]


def _named_folder(name: str, folder: Path, views: Mapping[str, int] | None = None) -> list[ReidSample]:
    """``<pid>_c<camera>...`` files of one folder; junk dropped; views looked up by file name if given."""
    samples, unviewed = [], 0
    for path in list_images(folder):
        found = _MARKET_NAME.match(path.name)  # Market-1501, DukeMTMC, Occluded-Duke, VeRi
        if found is None:
            raise InputError(f"cannot read person and camera from {str(path)!r}; {_LAYOUTS[name].title} names "
                             f"files '<id>_c<camera>...', e.g. '0002_c002_00030600_0.jpg'")
        pid = int(found.group(1))
        if pid == JUNK_PID:
            continue
        camid = _check_camera(name, int(found.group(2)), str(path))
        viewid = 0
        if views is not None:
            if path.name not in views:
                unviewed += 1
                continue
            viewid = views[path.name]
        samples.append(ReidSample(path, pid, camid, viewid))
    if unviewed:
        # TransReID drops these too; say so rather than shrink the split silently
        log.warning("%s: %d images in %s have no viewpoint in the keypoint files and were left out",
                    _LAYOUTS[name].title, unviewed, folder)
    if not samples:
        raise InputError(f"{str(folder)!r} holds no usable image: all are junk (person {JUNK_PID})"
                         + (" or have no viewpoint in the keypoint files" if unviewed else ""))
    return samples


def _named_splits(name: str, base: Path, folders: tuple[str, str, str] = _MARKET_FOLDERS,
                  views: Mapping[str, int] | None = None) -> tuple[list, list, list]:
    """Training, query and gallery from the ``<pid>_c<camera>...`` files of ``folders``."""
    train, query, gallery = (_named_folder(name, _require_dir(base / sub, _LAYOUTS[name]), views) for sub in folders)
    return train, query, gallery


def _veri_views(base: Path) -> dict[str, int] | None:
    """VeRi's viewpoint labels (the last column of ``keypoint_{train,test}.txt``), if the files are there."""
    files = [base / "keypoint_train.txt", base / "keypoint_test.txt"]
    present = [f for f in files if f.is_file()]
    if not present:
        log.info("VeRi-776: no keypoint_train.txt / keypoint_test.txt in %s; every image gets view 0", base)
        return None
    if len(present) == 1:
        raise InputError(f"VeRi-776: found {str(present[0])!r} but not {str(next(f for f in files if f not in present))!r}; "
                         f"the viewpoint labels come in both files")
    views: dict[str, int] = {}
    for file in reversed(present):   # the training file wins where both name an image, as in TransReID
        for number, line in enumerate(file.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                views[Path(fields[0]).name] = int(fields[-1])
            except ValueError:
                raise InputError(f"{file}:{number}: expected '<image path> <keypoints...> <view id>', got {line!r}") from None
    if min(views.values()) < 0:
        raise InputError(f"VeRi-776: view ids in {base} must be >= 0, got {min(views.values())}")
    return views


def _msmt_list(base: Path, folder: str, list_name: str) -> list[ReidSample]:
    list_file = base / list_name
    if not list_file.is_file():
        raise InputError(f"MSMT17: expected the list file {str(list_file)!r} (MSMT17 layout: {_LAYOUTS['msmt17'].expected})")
    image_dir = _require_dir(base / folder, _LAYOUTS["msmt17"])
    samples, first = [], None
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{list_file}:{number}"
        found = _MSMT_CAM.match(Path(fields[0]).name) if len(fields) == 2 else None
        if found is None or not fields[1].lstrip("-").isdigit():
            raise InputError(f"{where}: expected '<id folder>/<id>_<index>_<camera>_<date>..._<n>.jpg <id>', "
                             f"e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0', got {line!r}")
        pid = int(fields[1])
        if pid == JUNK_PID:
            continue
        path = image_dir / fields[0]
        first = first or path
        samples.append(ReidSample(path, pid, _check_camera("msmt17", int(found.group(1)), where), 0))
    if first is None:
        raise InputError(f"MSMT17: the list file {str(list_file)!r} names no images")
    if not first.is_file():
        raise InputError(f"MSMT17: {list_file} names {str(first)!r}, which does not exist; the lists "
                         f"give paths relative to {str(image_dir)!r}")
    return samples


def _msmt17(base: Path) -> tuple[list, list, list]:
    # TransReID trains on the training and validation lists together
    train = _msmt_list(base, "train", "list_train.txt") + _msmt_list(base, "train", "list_val.txt")
    return train, _msmt_list(base, "test", "list_query.txt"), _msmt_list(base, "test", "list_gallery.txt")


def _rgbnt_folder(folder: Path) -> list[ReidSample]:
    layout = _LAYOUTS["rgbnt201"]
    dirs = {m: _require_dir(folder / sub, layout) for m, sub in _RGBNT_FOLDERS.items()}
    samples = []
    for rgb in list_images(dirs["rgb"]):
        found = _RGBNT_NAME.match(rgb.name)
        if found is None:
            raise InputError(f"cannot read person and camera from {str(rgb)!r}; RGBNT201 names files "
                             f"'<id>_cam<camera>_...', e.g. '000001_cam1_0_00.jpg'")
        paths = {m: d / rgb.name for m, d in dirs.items()}
        for modality, path in paths.items():
            if not path.is_file():
                raise InputError(f"RGBNT201: {str(rgb)!r} has no {modality} counterpart; expected {str(path)!r}")
        samples.append(ReidSample(paths, int(found.group(1)), _check_camera("rgbnt201", int(found.group(2)), str(rgb)), 0))
    return samples


def _rgbnt201(base: Path) -> tuple[list, list, list]:
    test = _rgbnt_folder(base / "test")
    # MambaPro's protocol: the whole test folder is both the query and the gallery
    return _rgbnt_folder(base / "train_171"), test, list(test)


_READERS: dict[str, Callable[[Path], tuple[list, list, list]]] = {
    "market1501": lambda base: _named_splits("market1501", base),
    "dukemtmc": lambda base: _named_splits("dukemtmc", base),
    "occ_duke": lambda base: _named_splits("occ_duke", base),
    "folder": lambda base: _named_splits("folder", base),
    "msmt17": _msmt17,
    "veri": lambda base: _named_splits("veri", base, ("image_train", "image_query", "image_test"), _veri_views(base)),
    "rgbnt201": _rgbnt201,
}


def load_dataset(name: str, root: str | Path) -> ReidDataset:
    """Read data set ``name`` (one of :data:`DATASETS`) from its published folder layout under ``root``.

    Layouts (the data set's folder; ``"folder"`` is any tree in Market-1501's layout and naming, with
    any number of cameras):

    - ``market1501``, ``dukemtmc``, ``occ_duke``: ``bounding_box_train/``, ``query/``, ``bounding_box_test/``
      of ``<id>_c<camera>...`` crops.
    - ``msmt17``: ``train/``, ``test/`` and the lists ``list_train.txt``, ``list_val.txt`` (trained on
      together), ``list_query.txt``, ``list_gallery.txt`` of ``<relative path> <id>`` lines.
    - ``veri``: ``image_train/``, ``image_query/``, ``image_test/``; viewpoints from ``keypoint_train.txt``
      and ``keypoint_test.txt`` (last column) when both are in the folder, images without one then left
      out as TransReID does; without them every view is 0.
    - ``rgbnt201``: ``train_171/`` and ``test/``, each with ``RGB/``, ``NI/``, ``TI/`` holding the same file
      names; ``path`` maps ``"rgb"``, ``"nir"``, ``"tir"`` to the three files; query = gallery = ``test/``.

    Raises:
        InputError: a folder or list file is missing, a name or line cannot be parsed, a camera is
            outside the data set's range; the message names what was expected.
    """
    if name not in _READERS:
        raise InputError(f"unknown data set {name!r}; choose one of {DATASETS} (or --dataset folder in the CLI)")
    base = _dataset_dir(name, Path(root))
    train, query, gallery = _READERS[name](base)
    for split, samples in (("training", train), ("query", query), ("gallery", gallery)):
        if not samples:
            raise InputError(f"{_LAYOUTS[name].title} in {str(base)!r}: the {split} split is empty")
    modalities = tuple(_RGBNT_FOLDERS) if name == "rgbnt201" else ()
    return ReidDataset(name, base, _relabel(train), query, gallery, modalities)
