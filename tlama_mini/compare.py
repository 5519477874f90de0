"""Where do two implementations of the same model part ways? `compare_layers` runs tlama_mini's model
and a transformers model on the same tokens, records the residual stream after the embedding and
after every block, and returns the largest difference at each point, naming the first block whose
difference exceeds a tolerance. A wrong weight, a missed RoPE permutation or a different norm epsilon
shows up at the block where it first acts, instead of as "the logits differ".
Legend: B batch, T sequence, C d_model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerDiff:
    diffs: list[tuple[str, float]]  # ("embedding", d), ("layer 0", d), ..., ("logits", d): max |ours - theirs|
    first_bad: str | None           # the first point whose difference exceeds tol, or None

    def __str__(self) -> str:
        lines = [f"{name:>12}: max |diff| {d:.2e}" for name, d in self.diffs]
        lines.append(f"first point above tolerance: {self.first_bad}" if self.first_bad else "all within tolerance")
        return "\n".join(lines)


def _capture(layers: nn.ModuleList, store: list[torch.Tensor]) -> list:
    def hook(_module, _args, out):
        store.append((out[0] if isinstance(out, tuple) else out).detach().float())  # (B, T, C)
    return [layer.register_forward_hook(hook) for layer in layers]


@torch.no_grad()
def compare_layers(ours: nn.Module, theirs: nn.Module, tokens: torch.Tensor, tol: float = 1e-3) -> LayerDiff:
    """tokens (B, T). `theirs` is a transformers *ForCausalLM with `.model.embed_tokens` and
    `.model.layers` (Llama, Qwen3, Mixtral, SmolLM ...)."""
    mine: list[torch.Tensor] = []
    other: list[torch.Tensor] = []
    handles = _capture(ours.layers, mine) + _capture(theirs.model.layers, other)
    try:
        logits, _ = ours(tokens, kv_cache=False)
        ref = theirs(tokens).logits
    finally:
        for h in handles:
            h.remove()
    if len(mine) != len(other):
        raise ValueError(f"the models have {len(mine)} and {len(other)} blocks")
    points = [("embedding", ours.token_emb(tokens).float(), theirs.model.embed_tokens(tokens).float())]
    points += [(f"layer {i}", a, b) for i, (a, b) in enumerate(zip(mine, other))]
    points.append(("logits", logits.float(), ref.float()))
    diffs = [(name, (a - b).abs().max().item()) for name, a, b in points]
    first_bad = next((name for name, d in diffs if not d <= tol), None)
    return LayerDiff(diffs, first_bad)
