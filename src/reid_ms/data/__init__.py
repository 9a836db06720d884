"""Data for re-ID: data set readers, identity samplers, the training and evaluation transforms.

- :func:`load_dataset` reads Market-1501, DukeMTMC-reID, MSMT17, Occluded-Duke, VeRi-776 and RGBNT201 from
  their published layouts into lists of :class:`ReidSample`; :class:`ImageDataset` turns such a list into
  training items ``(image, pid, camid, viewid)``.
- :class:`RandomIdentitySampler` / :class:`DistributedRandomIdentitySampler` draw P x K batches.
- :func:`train_transform` (TransReID's augmentation) and :func:`eval_transform`.
- :class:`ReidImageFolder` reads one flat folder of Market-1501-named crops (evaluation, feature export).
"""

from reid_ms.data.datasets import DATASETS, ImageDataset, ReidDataset, ReidSample, load_dataset
from reid_ms.data.folder import (
    IMAGE_EXTENSIONS,
    JUNK_PID,
    REID_MEAN,
    REID_STD,
    ReidImageFolder,
    eval_transform,
    list_images,
    parse_market_name,
    read_image,
)
from reid_ms.data.samplers import DistributedRandomIdentitySampler, RandomIdentitySampler
from reid_ms.data.transforms import train_transform

__all__ = [
    # images in Market-1501 naming, evaluation
    "IMAGE_EXTENSIONS", "REID_MEAN", "REID_STD", "JUNK_PID", "parse_market_name", "list_images", "read_image",
    "eval_transform", "ReidImageFolder",
    # training data
    "DATASETS", "ReidSample", "ReidDataset", "ImageDataset", "load_dataset", "RandomIdentitySampler",
    "DistributedRandomIdentitySampler", "train_transform",
]
