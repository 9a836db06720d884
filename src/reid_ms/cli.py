"""The ``reid-ms`` command: list and inspect models, extract features, evaluate, export to ONNX.

    reid-ms list
    reid-ms info vit_b16_ms --img-size 256 128 --stride 12
    reid-ms extract vit_b16_ms --weights model.pth --images query/ --out query.npz
    reid-ms eval --query-feats query.npz --gallery-feats gallery.npz
    reid-ms eval vit_b16_ms --weights model.pth --query query/ --gallery bounding_box_test/
    reid-ms export vit_b16_ms --weights model.pth --camera-num 6 --out model.onnx
    reid-ms train vit_b16_ms --dataset market1501 --root data/market1501 --out runs/market

Model options shared by ``info``, ``extract``, ``eval`` and ``export``: ``--img-size``, ``--stride``,
``--camera-num`` and ``--set key=value`` (any keyword of :func:`reid_ms.build`, value read as a Python
literal, e.g. ``--set depth=2 --set "scales=(2, 4)"``), so a tiny model runs the whole pipeline in
seconds. Without ``--weights`` the model is randomly initialised (seeded by ``--seed``) and a warning
says so. Bad input ends the command with one line on stderr and exit status 2 (:func:`main` turns
:class:`~reid_ms.ReidMsError`, ``OSError`` and ``MemoryError`` into it, for every command); what can be
checked (output paths, ``--set`` types, the device, whether the weights fit in memory) is checked before
the model is built.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import sys
import types
import typing
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import reid_ms
from reid_ms.errors import CheckpointNotFoundError, ConfigError, InputError, ReidMsError

# torch, numpy and the model code are imported inside the commands that use them: --help, --version and
# list answer without paying for them.
if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from reid_ms.data import ReidImageFolder
    from reid_ms.models import BuiltModel

_logger = logging.getLogger("reid_ms.cli")

# Ranks ``eval`` reports, as re-ID papers do.
REPORTED_RANKS = (1, 5, 10)


# -- building the model ---------------------------------------------------------------------------

def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--set expects key=value with a Python identifier as key, got {item!r}")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text                     # a bare word such as mode=light stays a string
    return overrides


def _build_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :func:`reid_ms.build`; options left unset keep the registry's defaults."""
    kwargs = _parse_set(args.set)
    for option, key, value in (("--img-size", "img_size", args.img_size and tuple(args.img_size)),
                               ("--stride", "stride_size", args.stride),
                               ("--camera-num", "camera_num", args.camera_num)):
        if value is None:
            continue
        if key in kwargs:
            raise ConfigError(f"{key} is given twice, by {option} and by --set; keep one")
        kwargs[key] = value
    return kwargs


def _weights_path(weights: Optional[str]) -> Optional[Path]:
    if weights is None:
        return None
    if not Path(weights).is_file():
        raise CheckpointNotFoundError(f"--weights {weights!r} does not exist or is not a file")
    return Path(weights)


def _annotations(name: str) -> dict[str, Any]:
    """The annotated type of each keyword ``build(name)`` routes to a constructor, by keyword."""
    from reid_ms.heads import BNNeckHead
    from reid_ms.registry import ADAPTER_ARGS, get_spec

    spec = get_spec(name)
    hints: dict[str, Any] = {}
    for cls in (spec.backbone, reid_ms.MultiScaleSlidingWindow, spec.model or BNNeckHead, reid_ms.DimAdapter):
        try:
            found = typing.get_type_hints(cls.__init__)
        except (NameError, TypeError):            # annotations that do not resolve: the constructor checks
            continue
        if cls is reid_ms.DimAdapter:
            found = {key: found[arg] for key, arg in ADAPTER_ARGS.items() if arg in found}
        hints.update(found)
    return hints


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a Python literal from the command line) is of the annotated type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list, Sequence):
        return isinstance(value, (tuple, list)) and all(_fits(v, args[0]) for v in value)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return not isinstance(hint, type) or isinstance(value, hint)


def _check_types(name: str, kwargs: dict[str, Any]) -> None:
    hints = _annotations(name)
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            hint = hints[key]
            wanted = hint.__name__ if isinstance(hint, type) else str(hint).replace("collections.abc.", "")
            raise ConfigError(f"--set {key}={value!r}: {key} of {name} takes {wanted}")


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a torch device ({exc}); e.g. cpu, cuda, cuda:1") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: CUDA is not available here; use --device cpu")


def _memory_bytes(device: str) -> Optional[int]:
    """Memory a model on ``device`` must fit in: the GPU's, or the machine's RAM (``None`` if unknown)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):                  # no sysconf (Windows): no bound
        return None


class _OverBudget(Exception):
    pass


def _weight_bytes(name: str, kwargs: dict[str, Any], limit: int) -> int:
    """Bytes of the parameters and buffers of ``build(name, **kwargs)``, counted without allocating them.

    The model is built on the meta device (shapes only) while a registration hook adds up every parameter
    and buffer; :class:`_OverBudget` as soon as the sum passes ``limit``.
    """
    import torch
    from torch.nn.modules import module as torch_module

    total = 0

    def count(module: nn.Module, key: str, tensor: Optional[torch.Tensor]) -> None:
        nonlocal total
        total += 0 if tensor is None else tensor.numel() * tensor.element_size()
        if total > limit:
            raise _OverBudget

    hooks = [torch_module.register_module_parameter_registration_hook(count),
             torch_module.register_module_buffer_registration_hook(count)]
    try:
        with torch.device("meta"):
            reid_ms.build(name, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return total


# The backbones' block counts. Their blocks are alike, so the weights grow linearly with them.
BLOCK_COUNTS = ("depth", "layers")


def _check_model_fits(name: str, kwargs: dict[str, Any], device: str) -> None:
    """Refuse, before allocating anything, a model whose weights alone exceed ``device``'s memory."""
    limit = _memory_bytes(device)
    if limit is None:
        return
    try:
        for key in BLOCK_COUNTS:
            blocks = kwargs.get(key)
            if isinstance(blocks, int) and blocks > 3:
                # two small dry runs extrapolate depth=100000 at once, where the full one would build
                # about a thousand blocks before passing the bound
                try:
                    two, three = (_weight_bytes(name, {**kwargs, key: n}, limit) for n in (2, 3))
                except ReidMsError:         # a model that needs more blocks: the full dry run decides
                    continue
                if two + (blocks - 2) * (three - two) > limit:
                    raise _OverBudget
        _weight_bytes(name, kwargs, limit)
    except _OverBudget:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(f"{name}({given}) needs more than the {limit / 2 ** 30:.1f} GiB of memory of --device "
                          f"{device} for its weights alone; check the sizes (img_size, depth, widths)") from None


def _build_model(args: argparse.Namespace) -> BuiltModel:
    """The model named on the command line, in eval mode, on ``args.device``.

    Argument types, the device and the memory the weights need are checked before anything is allocated.
    """
    import torch

    weights = _weights_path(args.weights)
    kwargs = _build_kwargs(args)
    _check_types(args.name, kwargs)
    _check_device(args.device)
    _check_model_fits(args.name, kwargs, args.device)
    if weights is None and args.command != "info":
        _logger.warning("no --weights given: %s is randomly initialised (seed %d); its features are only "
                        "good for trying the pipeline", args.name, args.seed)
    torch.manual_seed(args.seed)
    model = reid_ms.build(args.name, pretrained=None if weights is None else str(weights), **kwargs)
    return model.eval().to(args.device)


def _check_output(path: Path, example: str) -> None:
    """Refuse, before any work, an ``--out`` path that cannot be written: a folder, or under a file."""
    if path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a folder; give a file name, e.g. {str(path / example)!r}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {str(path)!r} lies under {str(parent)!r}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(path)!r}: no permission to write in {str(parent)!r}")


def _check_one_folder_model(args: argparse.Namespace) -> None:
    """Refuse, before building it, a multi-modal model where one image folder is all the command reads."""
    from reid_ms.registry import get_spec

    if getattr(get_spec(args.name).model, "image_names", ("images",)) != ("images",):
        raise ConfigError(f"{args.name} is a multi-modal model: it needs one image folder per modality (rgb, nir, "
                          f"tir) and 'reid-ms {args.command}' reads one; extract its features in Python with "
                          f"model({{'rgb': ..., 'nir': ..., 'tir': ...}}) (docs/api.md), or export it with "
                          f"'reid-ms export {args.name}'")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings(args: argparse.Namespace, model: BuiltModel) -> dict[str, Any]:
    """Everything that changes the features; a resumed extraction must match it exactly."""
    weights = _weights_path(args.weights)
    build = {f"build.{k}": list(v) if isinstance(v, tuple) else v for k, v in _build_kwargs(args).items()}
    cfg = _input_config(args, model)
    return {"model": args.name, **build, "weights_sha256": None if weights is None else _sha256(weights),
            "seed": args.seed,                       # parts a checkpoint lacks keep their seeded init
            "img_size": list(model.backbone.img_size), "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def _input_config(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """The model's own input config (``model.pretrained_cfg``), with ``--mean`` / ``--std`` when given."""
    from reid_ms.preprocess import model_input_config

    given = {key: tuple(getattr(args, key)) for key in ("mean", "std") if getattr(args, key) is not None}
    return {**model_input_config(model), **given}


# -- feature extraction ---------------------------------------------------------------------------

def _camera_labels(model: Any, camids: torch.Tensor) -> Optional[torch.Tensor]:
    # Only models built with a camera table take camera labels; the others would reject them.
    return camids if model.backbone.camera_num > 0 else None


def extract_features(
    model: Any, dataset: ReidImageFolder, batch_size: int, device: str, workers: int = 0,
    desc: str = "extract", on_batch: Optional[Callable[[np.ndarray, np.ndarray], None]] = None,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings ``[N, feat_dim]`` float32 of every image of ``dataset`` (in its order), with a progress bar.

    ``on_batch(indices, feats)`` is called after each batch with the dataset indices and their rows,
    so a caller can save progress.
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    out = np.empty((len(dataset), model.feat_dim), dtype=np.float32)
    camids = None if dataset.camids is None else torch.tensor(dataset.camids, dtype=torch.long)
    with torch.inference_mode(), tqdm(total=len(dataset), desc=desc, unit="img", leave=False,
                                        disable=not progress) as bar:
        for images, indices in loader:
            cams = None if camids is None else _camera_labels(model, camids[indices].to(device))
            feats = model(images.to(device), cam_label=cams).float().cpu().numpy()
            out[indices.numpy()] = feats
            if on_batch is not None:
                on_batch(indices.numpy(), feats)
            bar.update(len(indices))
    return out


# What 'reid-ms extract' writes: feats [N, D] float32; pids, camids, paths [N]; the settings record (JSON);
# num_images, the folder's image count, so that a file saved part-way (N < num_images) is known as partial.
FEATURE_KEYS = ("feats", "pids", "camids", "paths", "settings", "num_images")


def _read_features(path: Path, need_ids: bool = True) -> dict[str, Any]:
    """A features file written by ``extract``, checked: its arrays agree in length, its settings are a record."""
    import numpy as np

    where = repr(str(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in FEATURE_KEYS if k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"cannot read features file {where}: {exc}") from exc
    missing = [k for k in FEATURE_KEYS if k not in arrays]
    if missing and "feats" in arrays and set(missing) <= {"pids", "camids"}:   # any file names: no ids
        if need_ids:
            raise InputError(f"{where} has no person and camera ids (its images were not named "
                             f"'<pid>_c<camera>...'); evaluation needs them")
        for k in missing:                 # placeholders: resuming recomputes ids from the names
            arrays[k] = np.zeros(arrays["feats"].shape[:1], dtype=np.int64)
    elif missing:
        raise InputError(f"{where} lacks {missing}; it was not written by this version of 'reid-ms "
                         f"extract': extract the features again (--overwrite replaces the file)")
    feats, rows = arrays["feats"], len(arrays["feats"]) if arrays["feats"].ndim else 0
    problems = [] if feats.ndim == 2 and feats.dtype.kind == "f" else [
        f"feats is {feats.dtype} {feats.shape}, not [N, D] float"]
    problems += [f"{k} has shape {arrays[k].shape} for {rows} rows of feats" for k in ("pids", "camids", "paths")
                 if arrays[k].shape != (rows,)]
    problems += [f"{k} holds {arrays[k].dtype}, not integers" for k in ("pids", "camids", "num_images")
                 if arrays[k].dtype.kind not in "iu"]
    try:
        settings = json.loads(str(arrays["settings"]))
    except ValueError as exc:
        problems.append(f"its settings record is not JSON ({exc})")
    else:
        if not isinstance(settings, dict):
            problems.append(f"its settings record is {type(settings).__name__}, not a JSON object")
    if arrays["num_images"].shape != ():
        problems.append(f"num_images has shape {arrays['num_images'].shape}, not a single count")
    if problems:
        raise InputError(f"{where} is damaged or was not written by 'reid-ms extract': {'; '.join(problems)}; "
                         f"extract the features again (--overwrite replaces the file)")
    return {**arrays, "paths": arrays["paths"].tolist(), "settings": settings, "num_images": int(arrays["num_images"])}


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _cmd_extract(args: argparse.Namespace) -> int:
    import numpy as np

    from reid_ms.data import ReidImageFolder, list_images, parse_market_name
    from reid_ms.preprocess import image_transform
    from reid_ms.training.checkpoint import atomic_write

    if args.batch_size < 1 or args.save_every < 1:
        raise ConfigError(f"--batch-size and --save-every must be >= 1, got {args.batch_size} and {args.save_every}")
    _check_one_folder_model(args)
    out = Path(args.out)
    _check_output(out, "features.npz")
    files = list_images(args.images)
    names = [f.name for f in files]
    old = _read_features(out, need_ids=False) if out.exists() and not args.overwrite else None
    try:
        ids = [parse_market_name(f) for f in files]
    except InputError:
        ids = None                        # any names: features only; 'reid-ms eval' needs Market-1501 names
    model = _build_model(args)
    if ids is None and model.backbone.camera_num > 0:
        raise InputError(f"{args.name} has a camera table but the names in {args.images!r} carry no cameras "
                         f"(Market-1501 '<pid>_c<camera>...'); use Python's reid_ms.FeatureExtractor with "
                         f"cam_label='mean' or 'none' for crops of unknown cameras")
    settings = _settings(args, model)

    done: dict[str, np.ndarray] = {}
    if old is not None:
        diff = _settings_diff(old["settings"], settings)
        if diff:
            raise InputError(f"{str(out)!r} was extracted with other settings ({'; '.join(diff)}); pass "
                             f"--overwrite to replace it or choose another --out")
        done = dict(zip(old["paths"], old["feats"]))
        gone = set(done) - set(names)
        if gone:
            _logger.warning("%d images in %s are no longer in %s; dropping them", len(gone), out, args.images)
    todo = [f for f in files if f.name not in done]
    _logger.info("%s: %d images, %d already extracted, %d to go", out, len(files), len(files) - len(todo), len(todo))

    def save() -> None:
        kept = [n for n in names if n in done]
        arrays: dict[str, Any] = {  # Any: np.savez's keywords include a bool, allow_pickle
            "feats": np.stack([done[n] for n in kept]) if kept else np.zeros((0, model.feat_dim), np.float32),
            "paths": np.array(kept, dtype=np.str_), "num_images": np.array(len(names), dtype=np.int64),
            "settings": np.array(json.dumps(settings, sort_keys=True))}
        if ids is not None:
            kept_ids = np.array([parse_market_name(n) for n in kept], dtype=np.int64).reshape(-1, 2)
            arrays.update(pids=kept_ids[:, 0], camids=kept_ids[:, 1])
        atomic_write(out, lambda f: np.savez(f, **arrays))  # a reader sees the old file or the new one, never half

    if todo:
        dataset = ReidImageFolder(args.images, image_transform(_input_config(args, model)), todo, ids=ids is not None)
        batches = 0

        def on_batch(indices: np.ndarray, feats: np.ndarray) -> None:
            nonlocal batches
            for i, row in zip(indices, feats):
                done[dataset.paths[i].name] = row
            batches += 1
            if batches % args.save_every == 0:
                save()

        extract_features(model, dataset, args.batch_size, args.device, args.workers, desc=out.name,
                         on_batch=on_batch, progress=not args.quiet)
    save()
    print(f"wrote {len(names)} features of width {model.feat_dim} to {out}")
    return 0


# -- evaluation -----------------------------------------------------------------------------------

Features = tuple["np.ndarray", "np.ndarray", "np.ndarray"]    # feats [N, D], pids [N], camids [N]


def _drop_junk(feats: np.ndarray, pids: np.ndarray, camids: np.ndarray, what: str) -> Features:
    # Market-1501's junk crops (person -1) are neither right nor wrong; TransReID's and CLIP-ReID's loaders
    # drop them before evaluating, so the numbers here are comparable to theirs.
    from reid_ms.data import JUNK_PID

    keep = pids != JUNK_PID
    if not keep.all():
        _logger.info("%s: ignoring %d junk images (person id %d)", what, int((~keep).sum()), JUNK_PID)
    return feats[keep], pids[keep], camids[keep]


def _features_from_dir(args: argparse.Namespace, model: BuiltModel, folder: str, what: str) -> Features:
    import numpy as np

    from reid_ms.data import ReidImageFolder
    from reid_ms.preprocess import image_transform

    dataset = ReidImageFolder(folder, image_transform(_input_config(args, model)))
    feats = extract_features(model, dataset, args.batch_size, args.device, args.workers, desc=what,
                             progress=not args.quiet)
    return feats, np.array(dataset.pids, dtype=np.int64), np.array(dataset.camids, dtype=np.int64)


def _cmd_eval(args: argparse.Namespace) -> int:
    from reid_ms.metrics import METRICS, evaluate, query_expansion

    if args.metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {args.metric!r}")
    from_files = args.query_feats is not None or args.gallery_feats is not None
    from_dirs = args.query is not None or args.gallery is not None
    if from_files == from_dirs:
        raise ConfigError("give either --query-feats and --gallery-feats (files from 'reid-ms extract'), or "
                          "--query and --gallery image folders with a model NAME")
    if args.show_ranks and not from_dirs:
        raise ConfigError("--show-ranks draws the images, so it needs --query and --gallery image folders with NAME")
    if args.aqe and args.metric != "cosine":
        raise ConfigError("--aqe (average query expansion) works on cosine similarity; drop --metric euclidean")
    if from_files:
        if args.query_feats is None or args.gallery_feats is None:
            raise ConfigError("--query-feats and --gallery-feats go together; give both")
        if args.name is not None:
            raise ConfigError(f"model {args.name!r} is not used with --query-feats/--gallery-feats; drop it")
        query, gallery = (_read_features(Path(p)) for p in (args.query_feats, args.gallery_feats))
        for d, p in ((query, args.query_feats), (gallery, args.gallery_feats)):
            if len(d["feats"]) != d["num_images"]:
                raise InputError(f"{p!r} holds {len(d['feats'])} of the {d['num_images']} images of its folder: its "
                                 f"extraction stopped early; run the same 'reid-ms extract' command again to finish it")
        diff = _settings_diff(query["settings"], gallery["settings"])
        if diff:
            raise InputError(f"{args.query_feats!r} and {args.gallery_feats!r} were extracted with different "
                             f"settings ({'; '.join(diff)}); their features cannot be compared")
        sets = [(d["feats"], d["pids"], d["camids"]) for d in (query, gallery)]
    else:
        if args.query is None or args.gallery is None or args.name is None:
            raise ConfigError("evaluating image folders needs --query, --gallery and a model NAME")
        _check_one_folder_model(args)
        model = _build_model(args)
        sets = [_features_from_dir(args, model, folder, what)
                for folder, what in ((args.query, "query"), (args.gallery, "gallery"))]
    (qf, q_pids, q_cams), (gf, g_pids, g_cams) = (_drop_junk(*s, what) for s, what in zip(sets, ("query", "gallery")))
    if args.aqe:
        qf = query_expansion(qf, gf, k=args.aqe).numpy()
    result = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=args.metric, rerank=args.rerank)
    print(f"queries {result.num_valid_queries} valid of {len(qf)}, gallery {len(gf)}, metric {args.metric}")
    for what, score in [*((f"Rank-{k}", result.rank(k)) for k in REPORTED_RANKS), ("mAP", result.mAP),
                        ("mINP", result.mINP)]:
        print(f"{what:<8} {100 * score:6.2f}%")
    if args.show_ranks:
        _show_ranks(args, (qf, q_pids, q_cams), (gf, g_pids, g_cams))
    return 0


def _show_ranks(args: argparse.Namespace, query: Features, gallery: Features) -> None:
    import torch

    from reid_ms.data import JUNK_PID, list_images, parse_market_name
    from reid_ms.metrics import TRANSREID_RERANK, re_ranking
    from reid_ms.visualize import show_ranks

    q_paths, g_paths = ([p for p in list_images(folder) if parse_market_name(p)[0] != JUNK_PID]
                        for folder in (args.query, args.gallery))
    q, g = torch.from_numpy(query[0]), torch.from_numpy(gallery[0])
    if args.metric == "cosine":
        q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    if args.rerank:
        dist = re_ranking(q, g, **TRANSREID_RERANK)
    else:
        dist = 1.0 - q @ g.T if args.metric == "cosine" else torch.cdist(q, g)
    out = Path(args.out or "ranks.png")
    show_ranks(dist, q_paths, g_paths, query[1], gallery[1], query[2], gallery[2], k=args.show_ranks,
               num_queries=args.num_queries, out=out)
    print(f"wrote the top-{args.show_ranks} ranked lists of {min(args.num_queries, len(q))} queries to {out}")


# -- list / info ----------------------------------------------------------------------------------

# The registered models, so that 'list' answers without importing torch; tests keep it equal to
# reid_ms.list_models().
MODEL_NAMES = ("clip_b16", "clip_b16_adapt_ms", "clip_b16_adapt_ms_light", "clip_b16_ms", "clip_b16_ms_light",
               "clip_b16_ms_rgbnt", "vit_b16", "vit_b16_jpm", "vit_b16_ms", "vit_b16_ms_jpm", "vit_b16_ms_light",
               "vit_b16_ms_rgbnt")


def _cmd_list(args: argparse.Namespace) -> int:
    print(*MODEL_NAMES, sep="\n")
    return 0


def _count(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _cmd_info(args: argparse.Namespace) -> int:
    from reid_ms.flops import count_flops
    from reid_ms.models import JPMReIDModel

    model = _build_model(args)
    backbone, neck, grid = model.backbone, model.neck, model.grid_size
    call, labels = model.call_args(model.example_inputs(batch=1))
    flops = count_flops(model, *call, **labels)
    parts = [type(m).__name__ for name, m in model.parts().items() if name != "head" and m is not None]
    multimodal = model.image_names != ("images",)
    shared = f", shared by {', '.join(model.image_names)}" if multimodal else ""
    print(f"model        {args.name} ({' + '.join(parts)}{shared})")
    print(f"input        {backbone.img_size[0]}x{backbone.img_size[1]}, patch {backbone.patch_size[0]}, "
          f"stride {backbone.stride_size[0]}x{backbone.stride_size[1]}"
          f"{', one image per modality' if multimodal else ''}")
    print(f"grid         {grid[0]} x {grid[1]} = {grid[0] * grid[1]} patches (+1 CLS)")
    jpm = model.jpm if isinstance(model, JPMReIDModel) else None
    what = f"{model.head.neck_feat} the BNNeck"
    if jpm is not None:
        what = f"global + {jpm.divide_length} local branches x {backbone.out_dim}, {what}s"
    elif multimodal:
        what = f"{len(model.image_names)} modalities x {backbone.out_dim}, {what}"
    print(f"tokens       {backbone.out_dim} wide; feature {model.feat_dim} wide ({what})")
    if jpm is not None:
        print(f"jpm          shift {jpm.shift_num}, shuffle groups {jpm.shuffle_groups}, "
              f"{jpm.divide_length} local groups, rearrange {jpm.rearrange}")
    print(f"neck         {'none' if neck is None else f'{neck.mode}, scales {tuple(neck.scales)}'}")
    print(f"cameras      {backbone.camera_num}, views {backbone.view_num}")
    counts = ", ".join(f"{name} {_count(module):,}" for name, module in model.parts().items())
    print(f"parameters   {_count(model):,} ({counts})")
    per = f"set of {len(model.image_names)} images ({', '.join(model.image_names)})" if multimodal else "image"
    print(f"FLOPs        {flops / 1e9:.4g} G per {per} ({flops:,}; multiply and add counted separately)")
    return 0


# -- export ---------------------------------------------------------------------------------------

def _cmd_export(args: argparse.Namespace) -> int:
    from reid_ms.export import export_onnx, onnx_max_error

    out = Path(args.out or f"{args.name}.onnx")
    _check_output(out, "model.onnx")
    model = _build_model(args).to("cpu")
    names = export_onnx(model, out, opset=args.opset)
    print(f"wrote {out} (inputs {', '.join(names)}; output features [batch, {model.feat_dim}])")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        _logger.info("onnxruntime is not installed; the exported graph was not run")
        return 0
    batch = 3                                    # not the traced batch size: checks the dynamic dimension
    err = onnx_max_error(model, out, batch=batch, seed=args.seed)
    print(f"onnxruntime check: max abs difference to PyTorch {err:.2e} on a batch of {batch}")
    if not err <= args.tolerance:
        raise InputError(f"the exported graph {str(out)!r} differs from the PyTorch model by {err:.2e} "
                         f"(> --tolerance {args.tolerance:g}); do not use it")
    return 0


# -- train --------------------------------------------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int:
    from reid_ms.training import train

    # the train parser's options are named as train()'s keywords
    options = {k: v for k, v in vars(args).items() if k not in ("command", "func", "quiet", "set")}
    result = train(**options, overrides=_parse_set(args.set), progress=not args.quiet)
    last = next((r for r in reversed(result.history) if r.get("mAP") is not None), None)
    if last is not None:
        print(f"epoch {last['epoch']}: mAP {100 * last['mAP']:.2f}%, rank-1 {100 * last['rank1']:.2f}%")
    print(f"wrote {result.checkpoint}, {result.out / 'metrics.jsonl'} and {result.out / 'config.json'}")
    return 0


# -- argument parsing -----------------------------------------------------------------------------

# reid_ms.training's DATASETS, RECIPES and AMP_DTYPES, spelled out so that the parser needs no torch (tested equal)
TRAIN_DATASETS = ("market1501", "dukemtmc", "msmt17", "occ_duke", "veri", "rgbnt201", "folder")
TRAIN_RECIPES = ("transreid", "clipreid")
TRAIN_AMP = ("bf16", "fp16")
NAME_HELP = "a registered model (see 'reid-ms list')"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid-ms", description="Re-ID backbones and necks: inspect, extract, "
                                     "evaluate, export.")
    parser.add_argument("--version", action="version", version=f"reid-ms {reid_ms.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # the options several commands share, as parent parsers
    common, model, weights, data = (argparse.ArgumentParser(add_help=False) for _ in range(4))
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    model.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    model.add_argument("--stride", type=int, help="patch stride, e.g. 16 or 12 (default: the model's)")
    model.add_argument("--camera-num", type=int, help="cameras of the camera embedding (SIE); 0 for none")
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other keyword of reid_ms.build, e.g. --set depth=2 --set embed_dim=64 (repeatable)")
    model.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    model.add_argument("--device", default="cpu", help="torch device (default cpu)")
    weights.add_argument("--weights", help="a local checkpoint; without it the model is randomly initialised")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--workers", type=int, default=0, help="image-loading processes (default 0: in-process)")
    data.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                      help="normalisation mean (default: the model's, model.pretrained_cfg)")
    data.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                      help="normalisation std (default: the model's)")

    sub.add_parser("list", parents=[common], help="names of the registered models").set_defaults(func=_cmd_list)

    p = sub.add_parser("info", parents=[common, model], help="parameters, FLOPs, grid and widths of a model")
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.set_defaults(func=_cmd_info, weights=None)

    p = sub.add_parser("extract", parents=[common, model, weights, data],
                       help="features of a folder of images, to .npz")
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.add_argument("--images", required=True, help="folder of images (any names; ids and cameras are read from "
                   "Market-1501 names <pid>_c<camera>... when all files have them, as 'eval' needs)")
    p.add_argument("--out", required=True, help=".npz with feats, paths (and pids, camids) (resumed if it exists)")
    p.add_argument("--save-every", type=int, default=20, help="save progress every N batches (default 20)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out exists")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("eval", parents=[common, model, weights, data],
                       help="CMC rank-1/5/10, mAP and mINP (Market-1501 protocol)")
    p.add_argument("name", metavar="NAME", nargs="?", help="a registered model (with --query/--gallery)")
    p.add_argument("--query-feats", help="query .npz written by 'reid-ms extract'")
    p.add_argument("--gallery-feats", help="gallery .npz written by 'reid-ms extract'")
    p.add_argument("--query", help="query image folder (with NAME)")
    p.add_argument("--gallery", help="gallery image folder (with NAME)")
    p.add_argument("--metric", default="cosine", help="cosine (default) or euclidean")
    p.add_argument("--rerank", action="store_true",
                   help="k-reciprocal re-ranking with TransReID's evaluation setting (k1=50, k2=15, lambda=0.3)")
    p.add_argument("--aqe", type=int, default=0, metavar="K",
                   help="average query expansion with the K nearest gallery features (cosine; default off)")
    p.add_argument("--show-ranks", type=int, default=0, metavar="K",
                   help="draw each query with its top-K gallery crops (green right, red wrong) to --out")
    p.add_argument("--num-queries", type=int, default=8, help="queries drawn by --show-ranks (default 8)")
    p.add_argument("--out", help="picture written by --show-ranks (default ranks.png)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", parents=[common, model, weights],
                       help="export a model to ONNX (checked with onnxruntime when installed)")
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--out", help="the .onnx file to write (default NAME.onnx)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted difference between onnxruntime and PyTorch (default 1e-3)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("train", parents=[common], help="train a model with TransReID's or CLIP-ReID's recipe")
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.add_argument("--dataset", required=True, choices=TRAIN_DATASETS,
                   help="data set layout; 'folder': ROOT/{bounding_box_train,query,bounding_box_test}")
    p.add_argument("--root", required=True, help="the data set's folder")
    p.add_argument("--out", required=True, help="run folder: config.json, last.pt, metrics.jsonl, curves.png")
    p.add_argument("--pretrained", help="backbone checkpoint to start from (ImageNet ViT, CLIP, ...)")
    p.add_argument("--recipe", choices=TRAIN_RECIPES, default="transreid")
    p.add_argument("--epochs", type=int, help="default: the recipe's (transreid 120, clipreid 60)")
    p.add_argument("--batch-size", type=int, help="global batch (default 64)")
    p.add_argument("--num-instances", type=int, help="images per identity in a batch (default 4)")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe setting (lr, warmup_epochs, margin, ...) or a keyword of reid_ms.build "
                        "(stride_size, depth, ...), value read as a Python literal (repeatable)")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (default: the recipe's, 10); 0: at the end")
    p.add_argument("--eval-first", action="store_true", help="also evaluate the untrained model (epoch 0)")
    p.add_argument("--workers", type=int, default=4, help="image-loading processes (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--amp", choices=TRAIN_AMP, help="mixed precision on CUDA")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``reid-ms`` with ``argv`` (default: the process arguments); returns the exit status."""
    args = build_parser().parse_args(argv)
    # Show reid_ms's own log records only (not those of torch.onnx & co.), on the current stderr; the
    # handler is removed again so in-process calls (tests, notebooks) do not pile them up.
    package_logger = logging.getLogger("reid_ms")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("reid-ms: %(message)s"))
    old_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args)
    except (ReidMsError, OSError, MemoryError) as exc:
        # One place for every command (and those added later): a problem the user can fix is one line on
        # stderr and exit status 2, never a traceback. OSError: unreadable inputs, unwritable outputs, full disk.
        message = str(exc) or type(exc).__name__
        if "Original Traceback" in message:     # raised in a DataLoader worker: torch appends its traceback
            message = message.rstrip().splitlines()[-1].partition(": ")[2] or message
        if isinstance(exc, MemoryError):
            message = f"out of memory ({message}); try a smaller --batch-size or a smaller model"
        print(f"reid-ms: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
