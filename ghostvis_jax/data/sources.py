"""Loading datasets (hub id or local folder) and the random-access `TaskSource` the pipeline reads.

A local folder may hold a `save_to_disk` dataset, parquet files, arrow files, JSON/JSONL files or
webdataset tars; files whose path names the split (`train-00000.parquet`, `validation/...`) are preferred.
Image columns are read undecoded and decoded by `load_image`, so a corrupt image skips its row instead of
crashing the reader.
"""

from __future__ import annotations

import collections
import glob
import os
from typing import Any

from ghostvis_jax.data import tasks
from ghostvis_jax.data.images import ImageDecodeError, load_image
from ghostvis_jax.data.tasks import SkipRow

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".tar": "webdataset"}
SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "train": ("train",), "test": ("test",)}


class EmptyDatasetError(RuntimeError):
    """A dataset with no usable row (every row skipped, or no rows at all)."""


class DatasetReadError(ValueError):
    """Local dataset files that cannot be read (not valid parquet / JSON / ..., e.g. text that is not UTF-8)."""


def _undecoded(feature):
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return type(feature)(_undecoded(feature.feature))
    if isinstance(feature, dict):
        return {k: _undecoded(v) for k, v in feature.items()}
    return feature


def _local_files(path: str, split: str) -> tuple[str, list[str]]:
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.splitext(f)[1] in _BUILDERS)
    if not files:
        raise FileNotFoundError(f"no parquet/arrow/json/tar files (or save_to_disk dataset) under {path!r}")
    kinds = {_BUILDERS[os.path.splitext(f)[1]] for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{path!r} mixes file kinds {sorted(kinds)}; point the config at one kind")
    aliases = SPLIT_ALIASES.get(split, (split,))

    def names_split(f: str) -> bool:
        rel = os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f)
        parts = rel.replace("\\", "/").replace("-", "/").replace("_", "/").replace(".", "/").split("/")
        return any(a in parts for a in aliases)

    matching = [f for f in files if names_split(f)]
    return kinds.pop(), matching or files


def load_hf_dataset(name: str, split: str = "train", *, path: str | None = None,
                    hub_id: str | None = None, hub_config: str | None = None, hub_split: str | None = None):
    """An HF `datasets.Dataset` for `name`/`split`, from `path` (local) or the hub, image columns undecoded."""
    import datasets

    src = tasks.split_source(name, split) if name in tasks.TASKS else None
    if path:
        saved = ("state.json", "dataset_dict.json")
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in saved):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                keys = [k for k in SPLIT_ALIASES.get(split, (split,)) if k in ds]
                if not keys:
                    raise KeyError(f"dataset {name!r}: {path!r} has splits {sorted(ds)}, none is {split!r}")
                ds = ds[keys[0]]
        else:
            builder, files = _local_files(path, split)
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train")
            except Exception as e:  # noqa: BLE001 — datasets wraps the cause in a message naming nothing
                cause = e.__cause__ or e
                shown = ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
                raise DatasetReadError(f"dataset {name!r}: cannot read {shown} as {builder} "
                                       f"({type(cause).__name__}: {cause})") from e
    else:
        hub_id = hub_id or (src.hub_id if src else None)
        if not hub_id:
            raise ValueError(f"dataset {name!r} split {split!r} has no hub id; give a local `path` in the config")
        kwargs: dict[str, Any] = {}
        if src and src.data_files:
            kwargs["data_files"] = src.data_files
        ds = datasets.load_dataset(hub_id, hub_config if hub_config is not None else (src.hub_config if src else None),
                                   split=hub_split or (src.hub_split if src else split), **kwargs)
    undecoded = datasets.Features({k: _undecoded(v) for k, v in ds.features.items()})
    if undecoded != ds.features:
        ds = ds.cast(undecoded)
    return ds


class TaskSource:
    """Random-access conversations of one dataset split (grain-compatible: `__len__`, `__getitem__`).

    `__getitem__` never raises for a bad row: it returns `{"skipped": reason, "dataset": name, "row": i}`,
    which the pipeline counts. `scan()` converts rows eagerly and returns the per-reason skip counts.
    """

    def __init__(self, name: str, split: str = "train", *, path: str | None = None, image_root: str | None = None,
                 schema: str | None = None, rows=None, hub_id: str | None = None, hub_config: str | None = None,
                 hub_split: str | None = None):
        self.name, self.split = name, split
        if schema is not None:
            if schema not in tasks.NATIVE_ADAPTERS:
                raise KeyError(f"dataset {name!r}: unknown schema {schema!r}; known: {sorted(tasks.NATIVE_ADAPTERS)}")
            self._adapter = tasks.NATIVE_ADAPTERS[schema]
            needs_root = schema in ("llava_instruct_150k", "sharegpt4v")
        else:
            src = tasks.split_source(name, split)
            self._adapter, needs_root = src.adapter, src.needs_image_root
        if needs_root and not image_root:
            raise ValueError(f"dataset {name!r} needs `image_root` (the folder its image file names are under)")
        self.image_root, self.path = image_root, path
        self._rows = rows if rows is not None else load_hf_dataset(
            name, split, path=path, hub_id=hub_id, hub_config=hub_config, hub_split=hub_split)
        if len(self._rows) == 0:
            raise EmptyDatasetError(f"dataset {name!r} split {split!r} has no rows (path={path!r})")

    def __len__(self) -> int:
        return len(self._rows)

    def conversation(self, index: int, *, decode_images: bool = True) -> dict[str, Any]:
        """Row `index` as a conversation; raises `SkipRow` for a bad row."""
        row = self._rows[int(index)]
        try:
            if self._adapter is tasks.llava_conversations:
                conv = self._adapter(row, index, image_root=self.image_root)
            else:
                conv = self._adapter(row, index)
        except SkipRow:
            raise
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise SkipRow(f"bad row ({type(e).__name__}: {e})") from e
        if decode_images:
            try:
                conv["images"] = [load_image(im, name=_image_name(self.name, index, im)) for im in conv["images"]]
            except ImageDecodeError as e:
                raise SkipRow("unreadable image") from e
        conv["dataset"] = self.name
        conv.setdefault("id", f"{self.name}/{self.split}/{index}")
        return conv

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.conversation(index)
        except SkipRow as e:
            return {"skipped": e.reason, "dataset": self.name, "row": int(index)}

    def scan(self, limit: int | None = None) -> tuple[list[dict[str, Any]], collections.Counter]:
        """Convert up to `limit` rows; returns (conversations, skipped-per-reason). Raises if none is usable."""
        convs, skipped = [], collections.Counter()
        for i in range(len(self) if limit is None else min(limit, len(self))):
            out = self[i]
            if "skipped" in out:
                skipped[out["skipped"]] += 1
            else:
                convs.append(out)
        if not convs:
            raise EmptyDatasetError(f"dataset {self.name!r} split {self.split!r}: every row was skipped "
                                    f"({dict(skipped)})")
        return convs, skipped

    def __repr__(self) -> str:
        return f"TaskSource({self.name!r}, split={self.split!r}, path={self.path!r}, rows={len(self)})"


def _image_name(dataset: str, index: int, image: Any) -> str:
    path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
    return f"dataset {dataset!r} row {index}" + (f" ({path})" if path else "")
