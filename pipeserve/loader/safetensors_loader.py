"""Reads tensors from an HF folder of one or many `*.safetensors` files, only those asked for."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm


def _tensor_files(folder: str) -> dict[str, list[str]]:
    """file -> tensor names, from the index when there is one (so no file is opened just to list it)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(os.path.join(folder, file), []).append(name)
        return by_file
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"model folder {folder!r} has no *.safetensors files")
    by_file = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            by_file[file] = list(f.keys())
    return by_file


class LazyTensor:
    """A checkpoint tensor not read yet: indexing reads only the rows/columns asked for.

    Tensor-parallel weight loaders slice what they were given, so each rank reads only its shard from disk.
    """

    def __init__(self, lazy_slice) -> None:
        self._slice = lazy_slice
        self.shape = torch.Size(lazy_slice.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        return self._slice[index]

    def materialize(self) -> torch.Tensor:
        return self._slice[:]


def iter_safetensors(folder: str, wanted: Callable[[str], bool],
                     disable_progress: bool = False) -> Iterator[tuple[str, LazyTensor]]:
    """Yield (name, lazy tensor) for each checkpoint tensor whose name passes `wanted`; others are never read,
    and of those only what the weight loaders index is."""
    by_file = {file: [n for n in names if wanted(n)] for file, names in _tensor_files(folder).items()}
    total = sum(len(names) for names in by_file.values())
    with tqdm(total=total, desc=f"loading {os.path.basename(folder.rstrip('/'))}", disable=disable_progress,
              unit="tensor") as bar:
        for file, names in by_file.items():
            if not names:
                continue
            with safe_open(file, framework="pt") as f:
                for name in names:
                    yield name, LazyTensor(f.get_slice(name))
                    bar.update(1)
