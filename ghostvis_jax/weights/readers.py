"""Read PyTorch / HF weight files into numpy, safely.

safetensors are parsed directly (header + memory map), so bfloat16 works without torch and a truncated file is
named as such. `.pt` / `.bin` files go through `torch.load(weights_only=True)` only: a pickle that would run
code is refused.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class WeightFileError(ValueError):
    """A weight file or folder that cannot be read; the message names it."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise WeightFileError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise WeightFileError(f"{path}: truncated or not safetensors (header of {header_len} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightFileError(f"{path}: unreadable safetensors header ({e})") from None
    data_start = 8 + header_len
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightFileError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise WeightFileError(f"{path}: truncated — tensor {name!r} needs bytes up to {data_start + end}, "
                                  f"the file has {size}")
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if (end - begin) != count * np.dtype(dtype).itemsize:
            raise WeightFileError(f"{path}: tensor {name!r} byte range does not match shape {shape}")
        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape) \
            if count else np.zeros(shape, dtype)
    return out


def read_torch_pickle(path: str) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightFileError(
            f"{path}: refused — it is not a plain tensor state dict (loading it would need arbitrary pickled "
            f"objects: {str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 — torch raises RuntimeError/EOFError/... for broken files
        raise WeightFileError(f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightFileError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for k, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise WeightFileError(f"{path}: entry {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def read_weight_file(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise WeightFileError(f"{path}: no such weight file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith((".pt", ".pth", ".bin")):
        return read_torch_pickle(path)
    raise WeightFileError(f"{path}: unknown weight file type (expected .safetensors, .pt, .pth or .bin)")


def read_hf_folder(folder: str) -> dict[str, np.ndarray]:
    """All tensors of an HF model folder: single or sharded safetensors, else pytorch_model.bin (sharded too)."""
    if not os.path.isdir(folder):
        raise WeightFileError(f"{folder}: no such model folder")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(folder, index_name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(read_weight_file(os.path.join(folder, shard)))
            return out
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return read_weight_file(os.path.join(folder, name))
    raise WeightFileError(f"{folder}: no model.safetensors, sharded safetensors index or pytorch_model.bin found")
