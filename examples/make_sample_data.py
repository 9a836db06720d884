"""Write the small synthetic re-ID set that ships in the package (Market-1501 naming, 128x64 JPEGs).

    python examples/make_sample_data.py                 # rewrites src/reid_ms/sample_set/{query,gallery}
    python examples/make_sample_data.py --out /tmp/sd   # somewhere else
    python examples/make_sample_data.py --market --train-people 60 --people 40 --out /tmp/synth

Each identity is a fixed "outfit" (head, shirt and trouser colours, a stripe); each camera changes the
brightness and colour cast; every crop gets a small shift and pixel noise. The set has 7 identities,
a query per identity, 4 gallery crops per identity over 4 cameras (one on the query's own camera, which
the Market-1501 protocol excludes), one identity seen by a single camera (its query has no valid match),
distractors (person 0) and junk crops (person -1). Seeded: the same files every run.

``--market`` writes a larger set in Market-1501's layout instead, for ``reid-ms train --dataset folder``:
``bounding_box_train/`` (``--train-people`` identities, ``--per-camera`` crops on each of the 4 cameras),
``query/`` (one crop per test identity) and ``bounding_box_test/`` (every test identity on every camera,
plus distractors and junk), with training and test identities disjoint, as in Market-1501.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 128, 64
NUM_PEOPLE = 6
CAMERAS = (1, 2, 3, 4)


def _outfit(rng: np.random.Generator) -> dict:
    return dict(head=rng.uniform(120, 230, 3), shirt=rng.uniform(0, 255, 3), trousers=rng.uniform(0, 255, 3),
                stripe=rng.uniform(0, 255, 3), stripe_row=int(rng.integers(36, 64)))


def _render(outfit: dict, camera: int, rng: np.random.Generator) -> Image.Image:
    img = np.full((HEIGHT, WIDTH, 3), 90.0)
    img[:, :] += rng.uniform(-30, 30, 3)                               # background differs per crop
    dy, dx = rng.integers(-4, 5, 2)
    top, left = 8 + dy, 16 + dx
    img[top:top + 22, left + 8:left + 24] = outfit["head"]
    img[top + 22:top + 66, left:left + 32] = outfit["shirt"]
    row = top + outfit["stripe_row"] - 30
    img[row:row + 6, left:left + 32] = outfit["stripe"]
    img[top + 66:top + 116, left + 2:left + 30] = outfit["trousers"]
    cast = np.random.default_rng(camera).uniform(0.8, 1.2, 3)          # each camera's colour response
    img = img * cast + rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _name(pid: int, camera: int, frame: int) -> str:
    pid_text = "-1" if pid < 0 else f"{pid:04d}"
    return f"{pid_text}_c{camera}s1_{frame:06d}_01.jpg"


def make_sample_data(out: Path, seed: int = 0) -> list[Path]:
    """Write ``out/query`` and ``out/gallery``; return the files written."""
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for split in ("query", "gallery"):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.jpg"):
            old.unlink()

    def save(split: str, pid: int, camera: int, img: Image.Image) -> None:
        path = out / split / _name(pid, camera, int(rng.integers(0, 999_999)))
        img.save(path, quality=85)
        written.append(path)

    for person in range(1, NUM_PEOPLE + 1):
        outfit = _outfit(rng)
        query_cam = CAMERAS[person % 2]
        save("query", person, query_cam, _render(outfit, query_cam, rng))
        for camera in CAMERAS:
            save("gallery", person, camera, _render(outfit, camera, rng))
    # Seen by camera 3 only: its query's one gallery match shares the camera and is excluded.
    lonely = _outfit(rng)
    save("query", NUM_PEOPLE + 1, 3, _render(lonely, 3, rng))
    save("gallery", NUM_PEOPLE + 1, 3, _render(lonely, 3, rng))
    for camera in (1, 2, 4):
        save("gallery", 0, camera, _render(_outfit(rng), camera, rng))     # distractors
    for camera in (2, 3):
        save("gallery", -1, camera, _render(_outfit(rng), camera, rng))    # junk
    return written


def make_market_data(out: Path, seed: int = 0, people: int = 40, train_people: int = 60,
                     per_camera: int = 2) -> list[Path]:
    """Write ``out/{bounding_box_train,query,bounding_box_test}``; return the files written."""
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.jpg"):
            old.unlink()

    def save(split: str, pid: int, camera: int, img: Image.Image) -> None:
        path = out / split / _name(pid, camera, len(written))   # the running count keeps names unique
        img.save(path, quality=85)
        written.append(path)

    for person in range(1, train_people + 1):
        outfit = _outfit(rng)
        for camera in CAMERAS:
            for _ in range(per_camera):
                save("bounding_box_train", person, camera, _render(outfit, camera, rng))
    for person in range(train_people + 1, train_people + people + 1):
        outfit = _outfit(rng)
        query_cam = CAMERAS[person % len(CAMERAS)]
        save("query", person, query_cam, _render(outfit, query_cam, rng))
        for camera in CAMERAS:
            save("bounding_box_test", person, camera, _render(outfit, camera, rng))
    for camera in CAMERAS:
        save("bounding_box_test", 0, camera, _render(_outfit(rng), camera, rng))       # distractors
        save("bounding_box_test", -1, camera, _render(_outfit(rng), camera, rng))      # junk
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "src" / "reid_ms" / "sample_set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--market", action="store_true",
                        help="a training set too, in Market-1501's layout (bounding_box_train, query, bounding_box_test)")
    parser.add_argument("--people", type=int, default=40, help="with --market: test identities (default 40)")
    parser.add_argument("--train-people", type=int, default=60, help="with --market: training identities (default 60)")
    parser.add_argument("--per-camera", type=int, default=2,
                        help="with --market: training crops of an identity per camera (default 2)")
    args = parser.parse_args(argv)
    if args.market:
        files = make_market_data(args.out, args.seed, args.people, args.train_people, args.per_camera)
    else:
        files = make_sample_data(args.out, args.seed)
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} images ({total / 1024:.0f} KiB) under {args.out}")


if __name__ == "__main__":
    main()
