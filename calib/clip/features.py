"""Pre-projection feature extraction and the feature cache; :func:`prepare_features` is the one entry point
(dataset name + CLIP model -> :class:`FeatureSet` of every split, from the cache when possible).

For every image calib caches ``h`` (input of the image tower's final linear map, ``[n, d_h]``),
``z = h @ W0 + b0`` (the CLIP image embedding, ``[n, d]``), and the labels ``y``, spurious
attribute ``a``, group ``g`` and image id.  Every method then runs on cached arrays in seconds.

Cache entries are keyed by a hash of (model name, weights fingerprint, preprocessing, dataset,
dataset version, split, format version): a cache made for another model, preprocessing or
dataset version is never picked up.  Each entry is written to a temporary file and renamed when
complete, so an interrupted extraction never leaves a file that looks valid; each stores a checksum of
its arrays, and a file that cannot be opened or fails it (truncated, edited by hand) is reported and
rebuilt.  Non-finite features stop with :class:`NonFiniteFeaturesError` before they are cached.  One process
extracts an entry at a time (a lock on ``<entry>.lock``): a second one asking for it meanwhile waits and reads it.

The zero-shot text prototypes are cached the same way under ``<cache>/text/`` (key, checksum, atomic write);
one that cannot be read or fails its check is named in a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from calib.clip.models import (
    LoadedClip,
    UnsupportedModelError,
    encode_pre_projection,
    load_clip,
    logit_scale,
    projection_params,
    text_prototypes,
)
from calib.clip.prompts import PromptBank, embed_texts, imagenet_templates
from calib.core import paths
from calib.core.files import atomic_write_bytes, locked
from calib.core.hashing import stable_hash
from calib.data import SPLITS, DatasetLayoutError, GroupDataset, SplitTable, prepare_dataset

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when what is cached changes (2: a checksum of the arrays)
CACHED_ARRAYS = ("h", "z", "y", "a", "g", "ids")


class NonFiniteFeaturesError(ValueError):
    """Features hold NaN or infinity; the message says where they came from and which rows."""


class CacheCorruptError(RuntimeError):
    """A feature-cache file cannot be opened or fails its checksum (it is rebuilt)."""


def check_finite(splits: dict[str, SplitFeatures], source: str, text: np.ndarray | None = None) -> None:
    """Raise :class:`NonFiniteFeaturesError` if any split's ``z`` or ``h`` (or ``text``) is not finite.

    ``source`` names where the features came from (a cache file, an npz, a model) for the message.
    """
    for split, feats in splits.items():
        for name in ("z", "h"):
            x = getattr(feats, name)
            if x is None:
                continue
            bad = ~np.isfinite(np.asarray(x, dtype=np.float64)).all(axis=1)
            if bad.any():
                rows = np.flatnonzero(bad)
                raise NonFiniteFeaturesError(
                    f"{source}: {len(rows)} of {len(x)} {split} rows of {name!r} hold NaN or infinity "
                    f"(first rows {rows[:5].tolist()}); no method can use them. Re-extract the features, or "
                    "check the weights (a broken checkpoint, or overflow under bf16 autocast: try amp=False)."
                )
    if text is not None and not np.isfinite(text).all():
        raise NonFiniteFeaturesError(f"{source}: the text prototypes hold NaN or infinity")


def subsample(data: FeatureSet, split: str, n: int, seed: int) -> FeatureSet:
    """``data`` with ``split`` cut to a seeded random ``n`` of its samples (kept in their order)."""
    import dataclasses

    s = data.splits[split]
    if n >= len(s.y):
        return data
    keep = np.sort(np.random.default_rng([seed, 7_919]).choice(len(s.y), size=n, replace=False))
    cut = {f.name: (None if getattr(s, f.name) is None else getattr(s, f.name)[keep]) for f in dataclasses.fields(s)}
    return dataclasses.replace(data, splits={**data.splits, split: SplitFeatures(**cut)})


def array_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``arrays`` (in name order)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class SplitFeatures:
    """Cached features of one split (``n`` samples).

    ``h [n, d_h]`` may be None when only final embeddings are known (bring-your-own npz).
    """

    z: np.ndarray  # [n, d] float32 image embeddings (unnormalised)
    y: np.ndarray  # [n] int64 class
    g: np.ndarray  # [n] int64 group
    a: np.ndarray | None = None  # [n] int64 spurious attribute
    ids: np.ndarray | None = None  # [n] int64 image ids
    h: np.ndarray | None = None  # [n, d_h] float32 pre-projection features

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class FeatureSet:
    """Everything a method sees: per-split features plus the frozen zero-shot head.

    ``W0 [d_h, d]`` and ``b0 [d]`` are the pretrained final projection; ``text [C, d]`` the
    normalised class prototypes; ``logit_scale`` the model's ``s``.
    """

    splits: dict[str, SplitFeatures]
    text: np.ndarray | None  # None when only embeddings are known (npz)
    logit_scale: float
    n_groups: int
    class_names: list[str]
    group_names: list[str]
    attr_names: list[str] | None = None
    W0: np.ndarray | None = None
    b0: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    # known unit directions of h-space, name -> [d_h] (only for synthetic features such as the testbed)
    directions: dict[str, np.ndarray] | None = None
    # the dataset's prompt file embedded by this CLIP (prompt-based methods); None without a prompt file
    prompts: PromptBank | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_group_counts(self) -> np.ndarray | None:
        """Training-set group sizes ``[n_groups]`` (weights of ``avg_acc_trainw``), if a train split exists."""
        tr = self.splits.get("train")
        return None if tr is None else np.bincount(tr.g, minlength=self.n_groups)


class ImageFiles(Dataset):
    """Images of one split, preprocessed; item = (tensor [3, H, W], index)."""

    def __init__(self, files: list[Path], preprocess):
        self.files = files
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                img = im.convert("RGB")
        except FileNotFoundError as err:
            raise DatasetLayoutError(f"image listed in the metadata is missing: {path}") from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DatasetLayoutError(f"image cannot be decoded (corrupted or truncated): {path} ({err})") from err
        return self.preprocess(img), i


def one_line_error(err: BaseException) -> str:
    """The message of ``err`` without a DataLoader worker's traceback (its last line, minus the type prefix)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    for prefix in (f"{type(err).__module__}.{type(err).__name__}: ", f"{type(err).__name__}: "):
        last = last.removeprefix(prefix)
    return last


def resolve_amp(loaded: LoadedClip, amp: bool | None) -> bool:
    """Whether extraction runs under bf16 autocast: ``amp`` if given, else on for CUDA only."""
    return torch.device(loaded.device).type == "cuda" if amp is None else bool(amp)


def cache_key(loaded: LoadedClip, dataset: GroupDataset, split: str, amp: bool | None = None) -> dict:
    """The fields that identify a feature-cache entry (bf16 and fp32 features are kept apart)."""
    return {
        "model": loaded.name,
        "weights": loaded.fingerprint,
        "preprocess": loaded.preprocess_id,
        "dataset": dataset.name,
        "dataset_version": dataset.version,
        "split": split,
        "n": len(dataset.splits[split]),
        "precision": "bf16-autocast" if resolve_amp(loaded, amp) else "fp32",
        "format": FORMAT_VERSION,
    }


def cache_path(key: dict, cache_dir: Path | None = None) -> Path:
    """``<cache>/features/<dataset>/<model>/<split>-<hash>.npz``."""
    base = Path(cache_dir or paths.cache_dir()) / "features" / key["dataset"] / key["model"].replace("/", "_")
    return base / f"{key['split']}-{stable_hash(key)}.npz"


def _save(path: Path, key: dict, feats: SplitFeatures) -> None:
    arrays = {k: getattr(feats, k) for k in CACHED_ARRAYS}
    buf = io.BytesIO()
    np.savez(buf, **arrays, key=np.array(json.dumps(key, sort_keys=True)), checksum=np.array(array_checksum(arrays)))
    atomic_write_bytes(path, buf.getvalue())


def _load(path: Path, key: dict) -> SplitFeatures:
    """Read a cache file; :class:`CacheCorruptError` when it cannot be opened or fails its checksum."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy where the archive should be
            raise CacheCorruptError(f"feature cache {path} is not an .npz archive")
        with data as f:
            stored = json.loads(str(f["key"]))
            arrays = {k: f[k] for k in CACHED_ARRAYS}
            checksum = str(f["checksum"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CacheCorruptError(f"feature cache {path} cannot be opened ({type(err).__name__}: {err})") from err
    if stored != key:
        raise RuntimeError(f"feature cache {path} was made for {stored}, not {key}; delete it")
    if array_checksum(arrays) != checksum:
        raise CacheCorruptError(f"feature cache {path} fails its checksum (edited or damaged)")
    return SplitFeatures(**arrays)


def default_num_workers() -> int:
    """DataLoader workers: one per spare core, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class _BatchShard(torch.utils.data.Sampler):
    """The batches ``rank, rank + world, ...`` of a fixed batching of ``n`` items: every process sees
    whole batches with the single-process boundaries, so features are bitwise the same."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int):
        self.batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)][rank::world]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised torch.distributed group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_split(
    loaded: LoadedClip,
    table: SplitTable,
    batch_size: int = 256,
    num_workers: int | None = None,
    amp: bool | None = None,
    desc: str = "features",
) -> SplitFeatures:
    """Run the image tower over one split.  ``amp`` (default: on for CUDA) uses bf16 autocast.

    Under torch.distributed the batches are sharded across processes and gathered on every rank.
    """
    from calib.core.logs import progress as tqdm

    device = torch.device(loaded.device)
    amp = resolve_amp(loaded, amp)
    workers = default_num_workers() if num_workers is None else num_workers
    rank, world = dist_info()
    sampler = _BatchShard(len(table.paths), batch_size, rank, world)
    loader = DataLoader(
        ImageFiles(table.paths, loaded.preprocess),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    parts = []
    try:
        for x, idx in tqdm(loader, desc=desc, unit="batch", mininterval=2, disable=rank != 0):
            x = x.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                h, z = encode_pre_projection(loaded.model, x)
            parts.append((idx.numpy(), h.float().cpu().numpy(), z.float().cpu().numpy()))
    except DatasetLayoutError as err:
        # a DataLoader worker re-raises with its whole traceback in the message: keep the one line that matters
        raise DatasetLayoutError(one_line_error(err)) from None
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = [p for rank_parts in gathered for p in rank_parts]
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
    h = np.concatenate([p[1] for p in parts])[order]
    z = np.concatenate([p[2] for p in parts])[order]
    return SplitFeatures(h=h, z=z, y=table.y, a=table.a, g=table.g, ids=table.ids)


def _load_or_none(path: Path, key: dict) -> SplitFeatures | CacheCorruptError | None:
    """The cached features at ``path``; None when there is no file, the error when it is damaged."""
    if not path.is_file():
        return None
    try:
        return _load(path, key)
    except CacheCorruptError as err:
        return err


def get_split_features(
    loaded: LoadedClip,
    dataset: GroupDataset,
    split: str,
    cache_dir: Path | None = None,
    **extract_kwargs,
) -> SplitFeatures:
    """Cached features of one split, extracting (and caching) them on a miss or a damaged file.

    The extraction runs under a lock on the entry, so two processes missing the same entry extract it once: the
    second waits, then reads what the first wrote.  A cache hit takes no lock (a read-only cache still works).
    """
    key = cache_key(loaded, dataset, split, amp=extract_kwargs.get("amp"))
    path = cache_path(key, cache_dir)
    found = _load_or_none(path, key)
    if isinstance(found, SplitFeatures):
        log.info("features %s/%s from cache %s", dataset.name, split, path.name)
        return found
    rank, world = dist_info()
    # Under torch.distributed every rank takes part in one sharded extraction (a collective): a file lock held by
    # one rank would leave the others waiting on it while it waits for them, so there the ranks do not lock.
    with locked(path, remove=True) if world == 1 else nullcontext():
        if world == 1 and path.is_file():
            found = _load_or_none(path, key)  # another process may have (re)built it while this one waited
            if isinstance(found, SplitFeatures):
                log.info("features %s/%s from cache %s (made by another process)", dataset.name, split, path.name)
                return found
        if isinstance(found, CacheCorruptError):
            log.warning("%s; rebuilding it", found)
        feats = extract_split(loaded, dataset.splits[split], desc=f"{dataset.name}/{split}", **extract_kwargs)
        check_finite({split: feats}, f"{loaded.name} ({loaded.pretrained}) on {dataset.name}")
        if rank == 0:  # one writer; the others wait so nobody reads a half-written cache
            _save(path, key, feats)
            log.info("cached %d %s/%s features at %s", len(feats), dataset.name, split, path)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return feats


def _embed_dim(loaded: LoadedClip) -> int | None:
    """The CLIP embedding width ``d`` (that of the image projection), None for a tower calib cannot split."""
    try:
        return int(projection_params(loaded.model)[0].shape[1])
    except UnsupportedModelError:
        return None


def _protos_problem(protos: np.ndarray, n_classes: int, d: int | None) -> str | None:
    """What is wrong with cached text prototypes (shape, dtype, values), or None: each row is a unit vector."""
    want = (n_classes, d if d is not None else protos.shape[-1])
    if protos.ndim != 2 or protos.shape != want:
        return f"holds an array of shape {protos.shape}, not {want}"
    if protos.dtype != np.float32:
        return f"holds {protos.dtype} values, not float32"
    if not np.isfinite(protos).all():
        return "holds NaN or infinity"
    if not np.allclose(np.linalg.norm(protos.astype(np.float64), axis=1), 1.0, atol=1e-3):
        return "holds rows that are not unit vectors"
    return None


def _read_protos(path: Path, key: dict, n_classes: int, d: int | None) -> np.ndarray:
    """Text prototypes from ``path`` (``.npz`` with key and checksum, or the older bare ``.npy``);
    :class:`CacheCorruptError` naming the file when it cannot be read or fails its check."""
    try:
        data = np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise CacheCorruptError(f"text-prototype cache {path} is not an .npz archive")
            with data as f:
                protos, stored, checksum = f["protos"], json.loads(str(f["key"])), str(f["checksum"])
            if stored != key:
                raise CacheCorruptError(f"text-prototype cache {path} was made for another model or prompts")
            if array_checksum({"protos": protos}) != checksum:
                raise CacheCorruptError(f"text-prototype cache {path} fails its checksum (edited or damaged)")
        elif isinstance(data, np.ndarray):
            protos = data
        else:
            data.close()
            raise CacheCorruptError(f"text-prototype cache {path} is not an .npy array")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CacheCorruptError(
            f"text-prototype cache {path} cannot be read ({type(err).__name__}: {one_line_error(err)})"
        ) from err
    problem = _protos_problem(protos, n_classes, d)
    if problem:
        raise CacheCorruptError(f"text-prototype cache {path} {problem}")
    return protos


def text_cache_path(loaded: LoadedClip, key: dict, cache_dir: Path | None = None) -> Path:
    """``<cache>/text/<model>-<hash>.npz`` (calib before the checksum wrote ``.npy`` there, still read)."""
    return Path(cache_dir or paths.cache_dir()) / "text" / f"{loaded.name}-{stable_hash(key)}.npz"


def get_text_prototypes(
    loaded: LoadedClip, class_names: list[str], templates: list[str] | None = None, cache_dir: Path | None = None
) -> np.ndarray:
    """Zero-shot class prototypes ``[C, d]`` (prompt ensemble), cached per weights and prompts.

    A cache file that cannot be read or fails its check (shape, finiteness, unit rows, checksum) is named in a
    warning and rebuilt.  Prototypes cached by an older calib as a bare ``.npy`` (same key) are still used when
    they pass the check, so their numbers stay the same.  No lock: computing them takes a second and every writer
    writes the same bytes atomically.
    """
    templates = templates or imagenet_templates()
    key = {"weights": loaded.fingerprint, "model": loaded.name, "classes": class_names, "templates": templates}
    path = text_cache_path(loaded, key, cache_dir)
    legacy = path.with_suffix(".npy")
    d = _embed_dim(loaded)
    for candidate in (path, legacy):
        if not candidate.is_file():
            continue
        try:
            return _read_protos(candidate, key, len(class_names), d)
        except CacheCorruptError as err:
            log.warning("%s; rebuilding it", err)
            with suppress(OSError):  # calib's own file: a damaged one is of no use to anybody
                candidate.unlink()
    protos = text_prototypes(loaded, class_names, templates).numpy()
    _write_keyed_array(path, key, "protos", protos)
    return protos


def _write_keyed_array(path: Path, key: dict, name: str, array: np.ndarray) -> None:
    """Write ``array`` as ``name`` into the ``.npz`` at ``path`` with its cache ``key`` and checksum, atomically."""
    buf = io.BytesIO()
    np.savez(
        buf,
        **{name: array},
        key=np.array(json.dumps(key, sort_keys=True)),
        checksum=np.array(array_checksum({name: array})),
    )
    atomic_write_bytes(path, buf.getvalue())


def get_prompt_bank(loaded: LoadedClip, dataset: GroupDataset, cache_dir: Path | None = None) -> PromptBank | None:
    """The text embeddings of ``dataset``'s prompt file under ``loaded`` (:class:`PromptBank`), cached per weights
    and prompts like the class prototypes; None when the dataset has no prompt file.  A file whose class or
    attribute names are not the dataset's is an error (:class:`calib.data.prompt_files.PromptFileError`)."""
    from calib.data.prompt_files import check_fits, has_prompt_file, load_prompt_file, prompt_texts

    if not has_prompt_file(dataset.name):
        return None
    spec = load_prompt_file(dataset.name)
    check_fits(spec, dataset.name, list(dataset.class_names), list(dataset.attr_names))
    texts = prompt_texts(spec)
    key = {"weights": loaded.fingerprint, "model": loaded.name, "prompts": texts}
    path = Path(cache_dir or paths.cache_dir()) / "text" / f"{loaded.name}-prompts-{stable_hash(key)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                vectors, stored, checksum = f["vectors"], json.loads(str(f["key"])), str(f["checksum"])
            if stored == key and array_checksum({"vectors": vectors}) == checksum and np.isfinite(vectors).all():
                return PromptBank(spec, texts, vectors)
            log.warning("prompt-embedding cache %s fails its check; rebuilding it", path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("prompt-embedding cache %s cannot be read (%s); rebuilding it", path, one_line_error(err))
    vectors = embed_texts(loaded.model, loaded.tokenizer, texts, loaded.device)
    _write_keyed_array(path, key, "vectors", vectors)
    return PromptBank(spec, texts, vectors)


def build_feature_set(
    loaded: LoadedClip,
    dataset: GroupDataset,
    splits: tuple[str, ...] = SPLITS,
    cache_dir: Path | None = None,
    **extract_kwargs,
) -> FeatureSet:
    """All splits' features plus the zero-shot head of ``loaded`` for ``dataset``."""
    W0, b0 = projection_params(loaded.model)
    return FeatureSet(
        splits={s: get_split_features(loaded, dataset, s, cache_dir, **extract_kwargs) for s in splits},
        text=get_text_prototypes(loaded, dataset.class_names, cache_dir=cache_dir),
        logit_scale=logit_scale(loaded.model),
        n_groups=dataset.n_groups,
        class_names=list(dataset.class_names),
        group_names=list(dataset.group_names),
        attr_names=list(dataset.attr_names),
        W0=W0.numpy(),
        b0=b0.numpy(),
        prompts=get_prompt_bank(loaded, dataset, cache_dir),
        meta={
            "dataset": dataset.name,
            "model": loaded.name,
            "pretrained": loaded.pretrained,
            "weights": loaded.fingerprint,
            "dataset_version": dataset.version,
            "device": loaded.device,
            "precision": "bf16-autocast" if resolve_amp(loaded, extract_kwargs.get("amp")) else "fp32",
        },
    )


def prepare_features(
    dataset: str,
    model: str,
    pretrained: str | None,
    root: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 256,
    num_workers: int | None = None,
) -> FeatureSet:
    """Features of every split of ``dataset`` under ``(model, pretrained)``, from the cache when possible."""
    ds = prepare_dataset(dataset, root)
    loaded = load_clip(model, pretrained, device=device)
    return build_feature_set(loaded, ds, batch_size=batch_size, num_workers=num_workers)
