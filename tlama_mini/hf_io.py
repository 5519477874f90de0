"""Reading a Hugging Face checkpoint directory, shared by `hf.py` (Llama, Qwen3, Mixtral) and
`hf_llama4.py`: the RoPE fields of a config.json, every tensor of the directory (safetensors, sharded or
not, or a pickle read with weights_only=True), and the check that the tensors are exactly the model's."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .config import RopeScaling, TlamaConfig
from .model import Transformer


def rope_from_hf(hf: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("unsupported partial_rotary_factor != 1.0: tlama_mini rotates the whole head")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r}; tlama_mini supports 'default' and 'llama3'")
    return theta, RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_seq_len=int(params["original_max_position_embeddings"]))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory. Pickles are read with weights_only=True, so a file that
    tries to run code while unpickling is refused instead of executed."""
    def read(file: Path) -> dict[str, torch.Tensor]:
        if file.resolve().parent != path.resolve():  # an index must not point outside the directory
            raise ValueError(f"checkpoint index points outside {path}: {file.name!r}")
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard {file} is missing")
        if file.suffix == ".safetensors":
            try:
                return load_file(file)
            except Exception as err:  # safetensors raises its own error type for a bad header
                raise ValueError(f"{file} is not a readable safetensors file ({err}); is it truncated?") from err
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"refused to load {file}: it is a pickle that contains more than tensors and might "
                             "run code when loaded. Only load files you trust; prefer safetensors") from err
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{file} is not a state dict (a dict of tensor names to tensors)")
        return tensors

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return read(path / single)
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read(path / shard).items()}
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors, model.safetensors.index.json or "
                            f"pytorch_model.bin; found {found}")


def check_tensors_match(tensors: dict[str, torch.Tensor], to_hf: Any, config: TlamaConfig) -> None:
    """Refuse, by name, a checkpoint whose tensors are not exactly those `to_hf(Transformer(config))` would
    write, with the same shapes (the config and the weights of different models)."""
    with torch.device("meta"):  # the expected names and shapes, without allocating memory
        expected = {k: v.shape for k, v in to_hf(Transformer(config)).items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint tensors do not match config.json: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {tuple(tensors[name].shape)}, but config.json implies "
                             f"{tuple(shape)}; the config and the weights belong to different models")
