"""Frozen-ViT feature cache (``run.cache_visual_features``): encode each image once, reuse it every epoch.

With the paper's frozen EVA and a deterministic transform (no augmentation), the tower output of
an image never changes, yet it is ≈ 20 % of a full-size training step. :meth:`VisualFeatureCache.fill`
runs ``model.encode_tower`` (ViT + ``ln_vision``) once over every image a run uses and stores
the (1 + N, C) result; the datasets then deliver those tokens instead of images and the model
continues with ``project_visual`` (merge + ``llama_proj``), so the loss is the same.

Layout (one safetensors file per distinct image, tensor ``"tower"`` of shape (1 + N, C))::

    <root>/<fingerprint>/info.json                  what the fingerprint stands for
    <root>/<fingerprint>/<k[:2]>/<k>.safetensors    k = SHA-256 of the image file's bytes

The fingerprint hashes the ViT + ``ln_vision`` weights, the image size (the transform) and the
storage dtype, so a folder can be shared by every run and stage that uses the same frozen EVA;
other weights or sizes land in another folder. Files are written to a temporary name and renamed.

Storage dtype = the autocast dtype when training under autocast, else the ``llama_proj`` weight
dtype (validation and evaluation run without autocast): ``llama_proj`` would cast its input to
exactly that dtype anyway, so cached and live features give bit-identical losses and answers.
Training and evaluation thus keep separate folders when their dtypes differ. Disk per image:
(1 + N) × C values, at 448 px 1025 × 1408 × 2 bytes ≈ 2.75 MiB in bf16 (5.5 MiB in fp32), e.g.
≈ 27 GiB for 10,000 training slices.

Users: the trainer (training images, and validation images at every epoch's validation), and
evaluation (:func:`minigpt4.evaluation.common.iter_batches`: ``eval_detection.py --checkpoints``
scores every epoch on the same images, reused when the checkpoints share the frozen EVA).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from safetensors.torch import load_file, save

from minigpt4.io import file_sha256, to_json

__all__ = ["VisualFeatureCache", "CachedTowerTokens", "image_key", "tower_fingerprint", "configured_feature_cache"]

_TENSOR = "tower"


def image_key(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of an image file's bytes: its content key in the cache."""
    try:
        return file_sha256(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None


def tower_fingerprint(model, storage_dtype: torch.dtype) -> str:
    """``<16 hex of SHA-256(ViT + ln_vision weights)>_<size>px_<dtype>``: names one cache folder.

    Hashes every tensor of ``visual_encoder`` and ``ln_vision`` (name, dtype, shape, bytes);
    ≈ 2 s for the 2 GB EVA ViT-g, once per run.
    """
    digest = hashlib.sha256()
    parts = {"visual_encoder": model.visual_encoder, "ln_vision": model.ln_vision}
    for prefix, module in parts.items():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{prefix}.{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    size = model.cfg.vision.image_size
    return f"{digest.hexdigest()[:16]}_{size}px_{str(storage_dtype).replace('torch.', '')}"


class CachedTowerTokens:
    """``features[i]`` → the cached (1 + N, C) tower tokens of a dataset's record ``i``.

    Small and picklable (a folder and a list of keys), so DataLoader workers read the files.
    """

    def __init__(self, folder: Path, keys: Sequence[str], shape: Optional[tuple[int, int]] = None) -> None:
        self.folder = Path(folder)
        self.keys = list(keys)
        self.shape = tuple(shape) if shape is not None else None
        """(1 + N, C) every entry must have (None: not checked)."""

    def __len__(self) -> int:
        return len(self.keys)

    def path(self, index: int) -> Path:
        key = self.keys[index]
        return self.folder / key[:2] / f"{key}.safetensors"

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.path(index)
        try:
            tokens = load_file(str(path))[_TENSOR]
        except FileNotFoundError:
            raise FileNotFoundError(f"feature cache file missing: {path} (was the cache folder cleaned during the run?)") from None
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise OSError(f"feature cache file {path} is unreadable ({err}); delete it to re-encode the image") from None
        if self.shape is not None and tuple(tokens.shape) != self.shape:
            # a replaced file would otherwise fail later in torch.stack, naming no file
            raise ValueError(f"feature cache file {path} holds a tensor of shape {tuple(tokens.shape)}, expected "
                             f"{self.shape} (replaced, or written for another model); delete it to re-encode the image")
        return tokens


class _Images(torch.utils.data.Dataset):
    """Transformed images (3, S, S) of a list of files, for the one encoding pass."""

    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return self.transform(image)
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from None


class VisualFeatureCache:
    """On-disk cache of ``model.encode_tower`` outputs for one frozen tower.

    Args:
        root: the cache folder (``run.feature_cache_dir`` or ``<output_dir>/feature_cache``).
        model: a MiniGPTPancreas with a frozen tower.
        autocast_dtype: the autocast dtype of the steps that will read the cache (None = no
            autocast, as in validation and evaluation); the tower runs under the same autocast here.

    Raises:
        ValueError: the model's tower is trainable (its output changes every step).
    """

    def __init__(self, root: Union[str, os.PathLike], model, autocast_dtype: Optional[torch.dtype] = None) -> None:
        if model.cfg.vision.trainable:
            raise ValueError("the feature cache needs a frozen vision tower, but model.vision.trainable is true")
        self.model = model
        self.autocast_dtype = autocast_dtype
        # the dtype llama_proj computes in: cast to it here or there, the projection sees the same values
        self.storage_dtype = autocast_dtype if autocast_dtype is not None else model.llama_proj.weight.dtype
        self.fingerprint = tower_fingerprint(model, self.storage_dtype)
        self.folder = Path(root) / self.fingerprint

    def fill(
        self, image_paths: Sequence[str], batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
    ) -> CachedTowerTokens:
        """Encode every image of ``image_paths`` that is not cached yet; return the lookup.

        With several processes each rank encodes its share of the missing images; call a
        barrier before reading entries another rank wrote.

        Args:
            image_paths: one path per dataset record (duplicates are encoded once).
            batch_size: images per tower forward.
            num_workers: DataLoader processes decoding and resizing the images.
        Returns:
            :class:`CachedTowerTokens` aligned with ``image_paths``.
        """
        keys = [image_key(path) for path in image_paths]
        vision = self.model.cfg.vision
        lookup = CachedTowerTokens(self.folder, keys, shape=(1 + vision.num_patches, vision.width))
        first_path: dict[str, str] = {}
        for key, path in zip(keys, image_paths):
            first_path.setdefault(key, str(path))
        # a key's owner follows from the key alone: ranks that look at the folder at different
        # moments (another rank already writing) still split the work without gaps
        mine = sorted(
            k for k in first_path
            if int(k[:8], 16) % world_size == rank and not (self.folder / k[:2] / f"{k}.safetensors").is_file()
        )
        if not mine:
            return lookup
        self._write_info()
        images = _Images([first_path[k] for k in mine], self.model.image_transform)
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers)
        done = 0
        for batch in loader:
            for key, tokens in zip(mine[done : done + len(batch)], self._encode(batch)):
                self._write(key, tokens)
            done += len(batch)
        return lookup

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        device = self.model.device
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            tower = self.model.encode_tower(images.to(device))
        return tower.to("cpu", self.storage_dtype)

    def _write(self, key: str, tokens: torch.Tensor) -> None:
        final = self.folder / key[:2] / f"{key}.safetensors"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        # serialised in memory and written with open(): a full disk then raises OSError(ENOSPC)
        # naming the file (safetensors' save_file raises its own SafetensorError)
        data = save({_TENSOR: tokens.contiguous()})
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, final)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror, str(err.filename or final)) from None

    def _write_info(self) -> None:
        info = self.folder / "info.json"
        if info.is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        vision = self.model.cfg.vision
        text = to_json({
            "fingerprint": self.fingerprint,
            "image_size": vision.image_size,
            "tokens": 1 + vision.num_patches,
            "width": vision.width,
            "dtype": str(self.storage_dtype).replace("torch.", ""),
            "content": "model.encode_tower(image_transform(image)): EVA ViT + ln_vision, CLS first",
            "key": "SHA-256 of the image file bytes",
        }, indent=2)
        tmp = info.with_name(f".info.json.{os.getpid()}.tmp")
        try:
            tmp.write_text(text + "\n")
            os.replace(tmp, info)
        except OSError as err:  # a full or read-only disk: name the cache file, not the temp name
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror, str(info)) from None


def configured_feature_cache(cfg, model, autocast_dtype: Optional[torch.dtype] = None) -> VisualFeatureCache:
    """The cache ``run.cache_visual_features`` asks for: in ``run.feature_cache_dir``, default
    ``<run.output_dir>/feature_cache``. Build it after the weights are loaded (the folder is
    named by them)."""
    root = Path(cfg.run.feature_cache_dir) if cfg.run.feature_cache_dir else Path(cfg.run.output_dir) / "feature_cache"
    return VisualFeatureCache(root, model, autocast_dtype=autocast_dtype)
