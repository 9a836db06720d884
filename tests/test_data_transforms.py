"""train_transform: TransReID's resize / flip / pad / crop / normalise / erase, step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reid_ms.data import train_transform
from reid_ms.errors import ConfigError


def _image(seed: int = 0, size=(20, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _oracle(img: Image.Image, hw, mean=(0.5,) * 3, std=(0.5,) * 3, flip=False) -> torch.Tensor:
    # PIL's bicubic resize to (W, H), [0, 1], (x - mean) / std
    resized = img.resize((hw[1], hw[0]), Image.BICUBIC)
    if flip:
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_resize_and_normalise():
    img = _image()
    out = train_transform((16, 8), flip_prob=0.0, padding=0, erase_prob=0.0, mean=(0.4, 0.5, 0.6),
                          std=(0.2, 0.25, 0.3))(img)
    assert out.shape == (3, 16, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, _oracle(img, (16, 8), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)))


def test_flip():
    img = _image(1)
    out = train_transform((16, 8), flip_prob=1.0, padding=0, erase_prob=0.0)(img)
    torch.testing.assert_close(out, _oracle(img, (16, 8), flip=True))


def test_pad_and_random_crop():
    img, p = _image(2), 3
    base = _oracle(img, (16, 8))
    # zero padding in pixel space is -1 after the (0.5, 0.5) normalisation
    padded = torch.nn.functional.pad(base, (p, p, p, p), value=-1.0)
    tf = train_transform((16, 8), flip_prob=0.0, padding=p, erase_prob=0.0)
    offsets = set()
    torch.manual_seed(0)
    for _ in range(20):
        out = tf(img)
        hits = [(i, j) for i in range(2 * p + 1) for j in range(2 * p + 1)
                if torch.allclose(out, padded[:, i:i + 16, j:j + 8], atol=1e-6)]
        assert hits, "the output is not a 16x8 window of the padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5


def test_random_erasing_with_per_pixel_noise():
    img = _image(3, size=(64, 128))
    clean = train_transform((128, 64), flip_prob=0.0, padding=0, erase_prob=0.0)(img)
    tf = train_transform((128, 64), flip_prob=0.0, padding=0, erase_prob=1.0)
    torch.manual_seed(1)
    for _ in range(10):
        out = tf(img)
        changed = (out != clean).any(0)
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        # one filled rectangle of 2 % to 1/3 of the image, all three channels replaced
        assert int(changed.sum()) == h * w
        assert 0.02 * 128 * 64 * 0.9 <= h * w <= 128 * 64 / 3 * 1.1
        noise = out[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        # per-pixel standard normal noise, not one colour per channel
        assert noise.std(dim=(1, 2)).min() > 0.7 and abs(float(noise.mean())) < 0.3
    assert torch.equal(train_transform((128, 64), flip_prob=0.0, padding=0, erase_prob=0.0)(img), clean)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        train_transform((256,))
    with pytest.raises(ConfigError):
        train_transform(erase_prob=1.5)
    with pytest.raises(ConfigError):
        train_transform(padding=-1)
