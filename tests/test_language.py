"""Instruction encoders: MiniLM offline, CLIP's text tower from a saved checkpoint, and the embedding caches."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from toolkit.encoders.language import CLIPTextEncoder, MiniLMEncoder, WordPositionEncoder
from toolkit.errors import ToolkitError

torch.set_num_threads(2)
TEXTS = ["pick up the red ball", "grab the red ball", "open the drawer"]


def count_calls(enc) -> list[list[str]]:
    """Record every model call (the texts it was run on)."""
    calls: list[list[str]] = []
    embed = enc._embed

    def counted(texts):
        calls.append(list(texts))
        return embed(texts)

    enc._embed = counted
    return calls


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder()


def test_minilm_offline_unit_norm_and_similarity(minilm):
    emb = minilm.encode(TEXTS)
    assert emb.shape == (3, 384) and minilm.out_dim == 384 and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        minilm.encode("open the drawer")


def test_cache_hits_do_not_rerun_the_model(minilm):
    enc = MiniLMEncoder()
    enc._model, enc._tokenizer = minilm._model, minilm._tokenizer  # share the loaded weights
    calls = count_calls(enc)
    first = enc.encode(["open the drawer", "close the drawer", "open the drawer"])
    assert calls == [["open the drawer", "close the drawer"]]  # each unique text once, one batch
    torch.testing.assert_close(first[0], first[2])
    again = enc.encode(["close the drawer", "open the drawer"])
    assert len(calls) == 1
    torch.testing.assert_close(again, first[[1, 0]])
    enc.encode(["open the drawer", "push the button"])
    assert calls[1:] == [["push the button"]]


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_disk_cache_round_trip_and_model_identity(minilm, tmp_path, suffix):
    path = tmp_path / f"instructions{suffix}"
    enc = MiniLMEncoder(cache_path=path)
    enc._model, enc._tokenizer = minilm._model, minilm._tokenizer
    emb = enc.encode(TEXTS)
    assert path.is_file()

    fresh = MiniLMEncoder(cache_path=path)
    calls = count_calls(fresh)
    torch.testing.assert_close(fresh.encode(TEXTS[::-1]), emb.flip(0))
    assert calls == [] and fresh._model is None  # served from disk, the model was never loaded

    other = MiniLMEncoder(cache_path=path)  # same file, another model identity: nothing is reused
    other.identity = "sentence-transformers/some-other-model"
    other._cache.clear()
    other._load_cache()
    assert other._cache == {}
    other._model, other._tokenizer = minilm._model, minilm._tokenizer
    calls = count_calls(other)
    other.encode(TEXTS[:1])
    assert calls == [TEXTS[:1]]
    # ... and the file now belongs to that model, so the first one recomputes
    again = MiniLMEncoder(cache_path=path)
    assert again._cache == {}


def test_bad_cache_path():
    with pytest.raises(ToolkitError, match="npz"):
        MiniLMEncoder(cache_path="instructions.json")


@pytest.fixture(scope="module")
def clip_text_checkpoint(tmp_path_factory):
    """A random open_clip ViT-B-32 saved as open_clip_model.safetensors, and its normalized text embeddings."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip_text") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with torch.no_grad():
        expected = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(TEXTS), normalize=True)
    return path, expected


def test_clip_text_tower_matches_reference(clip_text_checkpoint, tmp_path):
    path, expected = clip_text_checkpoint
    enc = CLIPTextEncoder("ViT-B-32", weights=str(path), cache_path=tmp_path / "instructions.pt")
    assert enc.out_dim == 512
    emb = enc.encode(TEXTS)
    torch.testing.assert_close(emb, expected)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # the on-disk cache written by CLIP is not MiniLM's
    assert MiniLMEncoder(cache_path=tmp_path / "instructions.pt")._cache == {}
    reloaded = CLIPTextEncoder("ViT-B-32", weights=str(path), cache_path=tmp_path / "instructions.pt")
    assert set(reloaded._cache) == set(TEXTS) and reloaded._model is None


def test_clip_text_missing_key_and_missing_weights(clip_text_checkpoint, tmp_path):
    from safetensors.torch import load_file

    path, _ = clip_text_checkpoint
    sd = load_file(str(path))
    del sd["transformer.resblocks.5.attn.out_proj.weight"]
    broken = tmp_path / "open_clip_model.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(ToolkitError, match=r"transformer\.resblocks\.5\.attn\.out_proj\.weight"):
        CLIPTextEncoder("ViT-B-32", weights=str(broken)).encode(TEXTS)
    with pytest.raises(ToolkitError, match=r"ViT-B-32\.pt"):
        CLIPTextEncoder("ViT-B-32", weights=str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("level", ["GoToLocal", "PutNextLocal", "GoToSeqS5R2", "BossLevel"])
def test_word_positions_encode_every_word_of_real_babyai_missions(level):
    """``language=babyai_words`` reads minigrid's own missions: each position's one-hot is that word, in order,
    so "put the red ball next to the green key" and its swap differ."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI levels)

    encoder = WordPositionEncoder()
    env = gym.make(f"BabyAI-{level}-v0")
    missions = sorted({env.reset(seed=s)[0]["mission"] for s in range(30)})
    codes = encoder(missions).view(len(missions), encoder.max_words, len(encoder.vocabulary))
    for mission, code in zip(missions, codes):
        words = mission.replace(",", " ").split()
        assert code.sum().item() == len(words) and (code.sum(-1) <= 1).all()
        assert [encoder.vocabulary[i] for i in code[:len(words)].argmax(-1)] == words
    swap = encoder(["put the red ball next to the green key", "put the green key next to the red ball"])
    assert not torch.equal(swap[0], swap[1])


def test_word_positions_refuse_unknown_words_and_long_instructions():
    encoder = WordPositionEncoder(vocabulary=["go", "to", "the", "ball"], max_words=4)
    assert encoder(["go to the ball"]).shape == (1, 16)
    with pytest.raises(ToolkitError, match=r"\['red'\] not in language.vocabulary"):
        encoder(["go to red ball"])
    with pytest.raises(ToolkitError, match="5 words; language.max_words=4"):
        encoder(["go to the ball ball"])
    with pytest.raises(ToolkitError, match="repeated words"):
        WordPositionEncoder(vocabulary=["go", "go"])
