"""Run state (optimizer, LR schedule, RNG, grad scaler) as safetensors + JSON: no pickle.

``torch.save`` pickles, and unpickling runs whatever the file asks for, so a checkpoint that
passed through other hands could run code on resume. Here a state is split into its tensors
(safetensors) and everything else (JSON); reading it back runs no code whatever the files hold.
The JSON keeps what JSON alone would lose: tuples, dictionaries with integer keys (an
optimizer's per-parameter state) and NumPy arrays (NumPy's RNG state).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.images import DataError


def split_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-able data, its tensors moved into ``tensors`` (keyed by position)."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(value.astype(np.int64, copy=False).copy())
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: split_tensors(item, tensors) for key, item in value.items()}
        return {
            "__items__": [
                [split_tensors(k, tensors), split_tensors(v, tensors)] for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [split_tensors(item, tensors) for item in value]}
    if isinstance(value, list):
        return [split_tensors(item, tensors) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(value, list):
        return [join_tensors(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(join_tensors(item, tensors) for item in value["__tuple__"])
    if "__items__" in value:
        return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in value["__items__"]}
    return {key: join_tensors(item, tensors) for key, item in value.items()}


def save_state(state: Any, folder: Path, name: str) -> list[Path]:
    """Write ``state`` as ``name.json`` (+ ``name.safetensors`` when it holds tensors); returns
    the files written."""
    tensors: dict[str, torch.Tensor] = {}
    data = split_tensors(state, tensors)
    files = [folder / f"{name}.json"]
    files[0].write_text(json.dumps(data))
    if tensors:
        files.append(folder / f"{name}.safetensors")
        save_file(tensors, files[1])
    return files


def load_state(folder: Path, name: str) -> Any:
    """Read what :func:`save_state` wrote; a file that is not what it should be is a
    :class:`DataError` naming it (nothing in it is ever executed)."""
    json_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    try:
        data = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"'{json_path}': not a readable checkpoint state file ({error})") from error
    tensors: dict[str, torch.Tensor] = {}
    if tensor_path.exists():
        try:
            tensors = load_file(tensor_path)
        except (SafetensorError, OSError) as error:
            raise DataError(
                f"'{tensor_path}': not a readable safetensors file ({error})"
            ) from error
    try:
        return join_tensors(data, tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"'{json_path}': does not match '{tensor_path.name}' ({error})") from error


def rng_state() -> dict[str, Any]:
    """This process's global random states: Python, NumPy, torch CPU and CUDA."""
    state = {
        "python": random.getstate(),
        # Legacy global NumPy state: what libraries that draw from np.random use.
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
