"""Checkpoints: round trip, atomic replacement, and refusal of anything that is not ours."""
import json
import os

import pytest
import torch

from tlama_mini import TlamaConfig, Transformer
from tlama_mini import checkpoint as ckpt
from tlama_mini.sample import load_for_inference
from tlama_mini.tokenizer import CharTokenizer

CFG = TlamaConfig.from_preset("tiny", vocab_size=65, max_seq_len=32, tie_embeddings=True)


def make(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG)


def save(path, model, step=1):
    state = {"step": step, "optimizer": {"lr": 1e-3, "m": torch.ones(3)}, "rng": [ckpt.rng_state(torch.device("cpu"))]}
    return ckpt.save_checkpoint(path, model, state, {"model": CFG.to_dict(), "step": step}, CharTokenizer("abc"))


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_round_trip_keeps_weights_tie_state_and_tokenizer(tmp_path):
    model = make(0)
    where = save(tmp_path / "ckpt", model, step=7)
    assert sorted(p.name for p in where.iterdir()) == ["config.json", "model.safetensors", "state.pt", "tokenizer.json"]
    loaded, tokenizer, meta = load_for_inference(tmp_path)  # the run folder works too
    assert weights_equal(model, loaded) and meta["step"] == 7
    assert loaded.output.weight is loaded.token_emb.weight  # the tie survives
    assert tokenizer.decode(tokenizer.encode("cab")) == "cab"
    state = ckpt.load_state(where)
    assert state["step"] == 7 and torch.equal(state["optimizer"]["m"], torch.ones(3))
    ckpt.set_rng_state(state["rng"][0], torch.device("cpu"))  # the RNG as it was at the save
    first = torch.rand(3)
    ckpt.set_rng_state(state["rng"][0], torch.device("cpu"))
    assert torch.equal(first, torch.rand(3))


def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    old = make(0)
    save(tmp_path / "ckpt", old, step=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing state.pt")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "ckpt", make(1), step=2)
    monkeypatch.undo()
    assert (tmp_path / "ckpt.tmp").exists()  # the half-written one is only ever in ckpt.tmp
    loaded, _, meta = load_for_inference(tmp_path)
    assert meta["step"] == 1 and weights_equal(old, loaded)
    new = make(2)
    save(tmp_path / "ckpt", new, step=3)  # the next save cleans up
    assert not (tmp_path / "ckpt.tmp").exists() and not (tmp_path / "ckpt.old").exists()
    assert weights_equal(new, load_for_inference(tmp_path)[0])


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    model = make(0)
    save(tmp_path / "ckpt", model, step=4)
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.old")  # the state right after the first rename
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "ckpt.old"
    assert weights_equal(model, load_for_inference(tmp_path)[0])
    save(tmp_path / "ckpt", make(1), step=5)
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "ckpt" and not (tmp_path / "ckpt.old").exists()


def test_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.find_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a tlama-mini checkpoint"):
        ckpt.find_checkpoint(tmp_path / "empty")
    where = save(tmp_path / "ckpt", make())
    (where / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a tlama-mini checkpoint config"):
        load_for_inference(where)


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_refuses_pickles_with_code_and_corrupt_weights(tmp_path):
    where = save(tmp_path / "ckpt", make())
    torch.save({"step": Evil()}, where / "state.pt")  # a pickle that would call print() when loaded
    with pytest.raises(ValueError, match="refusing to load"):
        ckpt.load_state(where)
    (where / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot load the weights"):
        ckpt.load_weights(make(), where)


def test_config_mismatch_names_the_fields(tmp_path):
    where = save(tmp_path / "ckpt", make())
    with pytest.raises(ValueError, match=r"d_model: checkpoint 64, now 32(.|\n)*n_layers: checkpoint 2, now 3"):
        ckpt.check_model_config(where, CFG.replace(d_model=32, n_layers=3).to_dict())
    ckpt.check_model_config(where, CFG.to_dict())  # the same config passes
    with pytest.raises(ValueError, match="other data"):
        ckpt.check_resumable(where, CFG.to_dict(), "0" * 64, "char")


def test_tied_matrix_loads_under_either_name_and_mismatches_are_named(tmp_path):
    from safetensors.torch import save_file
    model = make(0)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    for keep, drop in (("output.weight", "token_emb.weight"), ("token_emb.weight", "output.weight")):
        (tmp_path / keep).mkdir()
        save_file({k: v for k, v in sd.items() if k != drop}, str(tmp_path / keep / "model.safetensors"))
        other = make(1)
        ckpt.load_weights(other, tmp_path / keep)
        assert weights_equal(model, other) and other.output.weight is other.token_emb.weight
    (tmp_path / "short").mkdir()
    save_file({k: v for k, v in sd.items() if k != "norm.weight" and k != "output.weight"},
              str(tmp_path / "short" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing: \['norm.weight'\]"):
        ckpt.load_weights(make(), tmp_path / "short")
    untied = Transformer(CFG.replace(tie_embeddings=False))
    with pytest.raises(ValueError, match=r"missing: \['output.weight'\]"):
        ckpt.load_weights(untied, tmp_path / "token_emb.weight")  # a tied checkpoint into an untied model
