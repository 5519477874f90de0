"""Vision input (tlama_mini/vision.py) against transformers' Llama 4 and against slow references.

transformers 5's `Llama4ForConditionalGeneration.forward` raises when given pixel_values, so the
reference is composed from its own modules exactly as that forward would: token embeddings,
`get_image_features` (vision model + multi_modal_projector), `masked_scatter` at the image-token
positions, then `language_model`. Run with -s to see the measured max abs differences.
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.llama4 import modeling_llama4  # noqa: E402

from tlama_mini import TlamaConfig, Transformer, generate  # noqa: E402
from tlama_mini.config import VisionConfig  # noqa: E402
from tlama_mini.hf import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from tlama_mini.vision import (merge_image_features, patchify, patchify_unfold, pixel_shuffle,  # noqa: E402
                               pixel_shuffle_loop, vision_freqs_cis)

from test_hf_llama4 import CASES, TEXT, max_diff, randomize_  # noqa: E402

TOL = 1e-4
IMG = 120  # image token id
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
              patch_size=4, vision_output_dim=48, pixel_shuffle_ratio=0.5, projector_input_dim=48,
              projector_output_dim=48, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
PER_IMAGE = 16  # (32 / 4 * 0.5) ** 2


def build_hf_vlm(seed: int):
    text = {**TEXT, **CASES["moe-every-2nd-nope-chunked-temperature"]}
    config = transformers.Llama4Config(text_config=text, vision_config=VISION, image_token_index=IMG,
                                       boi_token_index=121, eoi_token_index=122)
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def hf_logits(hf, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """What Llama4ForConditionalGeneration.forward computes, from its parts. (B, T, V)."""
    embeds = hf.get_input_embeddings()(ids)
    feats = hf.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    feats = feats.reshape(-1, feats.shape[-1])
    mask = (ids == IMG)[..., None].expand_as(embeds)
    return hf.language_model(inputs_embeds=embeds.masked_scatter(mask, feats)).logits


def prompt(seed: int) -> torch.Tensor:
    """Row 0: text, image, text, image, text; row 1: text, image, text. 44 positions each."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(0, IMG, (n,), generator=g)

    img = torch.full((PER_IMAGE,), IMG)
    row0 = torch.cat([text(3), img, text(4), img, text(5)])
    row1 = torch.cat([text(20), img, text(8)])
    return torch.stack([row0, row1])


def images(seed: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama4-vlm")
    hf = build_hf_vlm(6000)
    hf.save_pretrained(path)
    return hf, load_hf_checkpoint(path, max_batch_size=2).eval(), path


def test_patchify_and_pixel_shuffle_equal_their_references_and_transformers():
    x = torch.randn(2, 3, 12, 20)
    assert torch.equal(patchify(x, 4), patchify_unfold(x, 4))  # (2, 15, 48)
    feats = torch.randn(3, 64, 10)  # an 8 x 8 grid
    assert torch.equal(pixel_shuffle(feats, 0.5), pixel_shuffle_loop(feats, 0.5))
    assert torch.equal(pixel_shuffle(feats, 0.5), modeling_llama4.pixel_shuffle(feats, 0.5))
    assert torch.equal(pixel_shuffle(feats, 0.25), pixel_shuffle_loop(feats, 0.25))
    assert pixel_shuffle(feats, 0.25).shape == (3, 4, 160)
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 12, 4), 0.5)


def test_2d_rope_equals_transformers():
    hf_cfg = transformers.Llama4VisionConfig(**VISION)
    ref = modeling_llama4.Llama4VisionRotaryEmbedding._compute_freqs_ci(hf_cfg)  # (N+1, 1, D/2)
    ours = vision_freqs_cis(8, 8, 10000.0)
    assert ours.shape == (65, 4)
    assert torch.allclose(ours, ref[:, 0], atol=1e-6)


def test_merge_writes_features_in_order_at_the_masked_positions():
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[False, True, False, True, False], [True, False, False, False, False]])
    feats = torch.arange(9.0).reshape(3, 3)
    out = merge_image_features(h, mask, feats)
    assert torch.equal(out[0, 1], feats[0]) and torch.equal(out[0, 3], feats[1]) and torch.equal(out[1, 0], feats[2])
    assert torch.equal(out[~mask], h[~mask])
    with pytest.raises(ValueError, match=r"3 image positions need features of shape \(3, 3\)"):
        merge_image_features(h, mask, feats[:2])


def test_vision_checkpoint_logits_cached_decode_and_generation_match_transformers(vlm):
    hf, ours, _ = vlm
    c = ours.config
    assert c.vision == VisionConfig(image_size=32, patch_size=4, d_model=32, n_layers=2, n_heads=4, ffn_dim=128,
                                    pixel_shuffle_ratio=0.5, projector_dim=48)
    assert c.image_token_id == IMG and c.vision.tokens_per_image == PER_IMAGE
    ids, pix = prompt(6001), images(6001)
    with torch.no_grad():
        ref = hf_logits(hf, ids, pix)
        full, _ = ours(ids, images=pix, kv_cache=False)
        prefill = 40  # both rows' images are in the prefill; then one token at a time
        steps = [ours(ids[:, :prefill], images=pix, kv_cache=True)[0]]
        steps += [ours(ids[:, p, None], start_pos=p)[0] for p in range(prefill, ids.shape[1])]
        cached = torch.cat(steps, dim=1)
        text_only = hf.language_model(ids.masked_fill(ids == IMG, 0)).logits
    d_full, d_cached = max_diff(full, ref), max_diff(cached, ref)
    print(f"\n[llama4 vision] 3 images in 2 rows: logits max|diff| = {d_full:.2e}, cached = {d_cached:.2e} "
          f"(|logits| up to {ref.abs().max():.1f}; the images move them by {max_diff(ref, text_only):.1f})")
    assert d_full < TOL and d_cached < TOL

    # greedy generation = an argmax loop over the reference's logits, cached = uncached
    n_new = 10
    seq = ids
    with torch.no_grad():
        for _ in range(n_new):
            seq = torch.cat([seq, hf_logits(hf, seq, pix)[:, -1].argmax(-1, keepdim=True)], dim=1)
    out = generate(ours, ids, n_new, temperature=0, images=pix)
    assert torch.equal(out, seq)
    assert torch.equal(generate(ours, ids, n_new, temperature=0, images=pix, use_cache=False), seq)


def test_training_with_images_ignores_image_positions_in_the_loss(vlm):
    _, ours, _ = vlm
    ids, pix = prompt(6002), images(6002)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    ours.train()
    try:
        aux_losses = []  # what each MoE layer returned as its load-balancing loss
        hooks = [layer.ffn.register_forward_hook(lambda mod, inp, out: aux_losses.append(out[1]))
                 for layer in ours.layers if layer.ffn.__class__.__name__ == "MoE"]
        try:
            logits, loss = ours(inputs, targets=targets, images=pix)
        finally:
            for h in hooks:
                h.remove()
        keep = targets != IMG
        assert aux_losses
        aux = sum(aux_losses)
        expect = torch.nn.functional.cross_entropy(logits[keep], targets[keep]) + ours.config.moe_aux_loss_coef * aux
        assert torch.allclose(loss, expect, atol=1e-6)
        loss.backward()
        assert ours.vision.patch_emb.weight.grad.abs().sum() > 0 and ours.vision.projector.weight.grad.abs().sum() > 0
    finally:
        ours.zero_grad(set_to_none=True)
        ours.eval()


def test_round_trip_to_llama4_for_conditional_generation(vlm, tmp_path):
    _, ours, _ = vlm
    save_hf_checkpoint(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Llama4ForConditionalGeneration"]
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, pix = prompt(6003), images(6003)
    with torch.no_grad():
        d = max_diff(ours(ids, images=pix, kv_cache=False)[0], hf_logits(hf, ids, pix))
    print(f"\n[llama4 vision] round trip: logits max|diff| = {d:.2e}")
    assert d < TOL
    back = load_hf_checkpoint(tmp_path, max_batch_size=2)
    assert back.config.vision == ours.config.vision and back.config.image_token_id == IMG
    sd, back_sd = ours.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys() and all(torch.equal(sd[k], back_sd[k]) for k in sd)


def test_bad_image_input_gets_a_clear_error(vlm):
    _, ours, _ = vlm
    ids, pix = prompt(6004), images(6004)
    with torch.no_grad():
        with pytest.raises(ValueError, match="text-only model"):
            Transformer(TlamaConfig.from_preset("tiny")).eval()(ids[:, :10] % 256, images=pix)
        with pytest.raises(ValueError, match=r"tokens hold 48 image tokens .* 2 images need 16 each = 32"):
            ours(ids, images=pix[:2])
        with pytest.raises(ValueError, match=r"tokens hold 48 image tokens .* but no images were given"):
            ours(ids)
        with pytest.raises(ValueError, match=r"images must have shape \(I, 3, 32, 32\).*got \(3, 3, 28, 32\)"):
            ours(ids, images=pix[:, :, :28])
        with pytest.raises(ValueError, match=r"images must have shape \(I, 3, 32, 32\).*got \(3, 1, 32, 32\)"):
            ours(ids, images=pix[:, :1])
        with pytest.raises(ValueError, match="images must be a float tensor.*torch.uint8"):
            ours(ids, images=(pix * 50).clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match="vision and image_token_id"):
        TlamaConfig.from_preset("tiny", vision=VisionConfig(image_size=32, patch_size=4, d_model=32, n_layers=1,
                                                            n_heads=4, ffn_dim=64, projector_dim=32))
    with pytest.raises(ValueError, match="pixel_shuffle_ratio"):
        VisionConfig(image_size=24, patch_size=4, d_model=32, n_heads=4, pixel_shuffle_ratio=0.25)


def test_a_vision_config_survives_to_dict_and_from_dict():
    vision = VisionConfig(image_size=32, patch_size=8, d_model=48, n_layers=1, n_heads=2, ffn_dim=192, projector_dim=64)
    config = TlamaConfig.from_preset("tiny", vision=vision, image_token_id=1)
    assert TlamaConfig.from_dict(config.to_dict()) == config
    assert (vision.grid_size, vision.tokens_per_image, vision.shuffled_dim) == (4, 4, 192)
