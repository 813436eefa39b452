"""The public text API on a tiny random model with a real tokenizer: complete / stream / stop rules /
seeded sampling / batching, clear errors for impossible requests."""
from __future__ import annotations

import pytest
import torch

import mmstack
from golden import golden_dir
from mmstack.api import CapabilityError
from mmstack.decoding import GenerationError
from mmstack.formats import read_config
from mmstack.loading import build_model, save_pretrained
from mmstack.variants import variant_config


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    cfg = read_config(variant_config("deepseek-vl2-small", debug=True))  # MLA + MoE, vocab 512
    cfg = cfg.only(())  # the language model alone: a text-only checkpoint
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    d = tmp_path_factory.mktemp("tiny")
    save_pretrained(model, d, tokenizer_dir=golden_dir() / "vl2_tokenizer")
    return mmstack.load(d, device="cpu")


def test_complete_and_stream_agree(pipe):
    text = pipe.complete("Hello there", max_new_tokens=12)
    assert isinstance(text, str) and text
    assert "".join(pipe.stream("Hello there", max_new_tokens=12)) == text


def test_stop_strings_truncate_and_stop(pipe):
    text = pipe.complete("Hello there", max_new_tokens=16)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    cut = pipe.complete("Hello there", max_new_tokens=16, stop_strings=[stop])
    assert cut == text[: text.find(stop)]


def test_stop_token_ids_end_generation(pipe):
    ids = pipe.complete_ids("Hello there", max_new_tokens=10)[0]
    k = 4
    got = pipe.complete_ids("Hello there", max_new_tokens=10, stop_token_ids=[ids[k]])[0]
    assert got == ids[: ids.index(ids[k])]


def test_seeded_sampling_is_reproducible(pipe):
    a = pipe.complete("A", max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    assert a == pipe.complete("A", max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    others = {pipe.complete("A", max_new_tokens=12, temperature=1.0, top_p=0.95, seed=s) for s in range(8, 12)}
    assert others - {a}


def test_batch_with_left_padding_equals_single_prompts(pipe):
    prompts = ["Hello there, how are you", "Hi"]
    batched = pipe.complete(prompts, max_new_tokens=8)
    assert batched == [pipe.complete(p, max_new_tokens=8) for p in prompts]


def test_repetition_penalty_avoids_repeats(pipe):
    ids = pipe.complete_ids("Hello", max_new_tokens=20, repetition_penalty=1e6)[0]
    prompt = set(pipe.tokenizer.encode("Hello"))
    assert len(ids) == len(set(ids)) and not prompt & set(ids)


def test_logits_shape_and_dtype(pipe):
    lg = pipe.logits(torch.tensor([[1, 2, 3]]))
    assert lg.shape == (1, 3, 512) and lg.dtype == torch.float32


def test_clear_errors(pipe):
    with pytest.raises(GenerationError, match="exceeds the model context"):
        pipe.complete("Hi", max_new_tokens=10**5)
    with pytest.raises(GenerationError, match="empty prompt"):
        pipe.complete([], max_new_tokens=3)
    with pytest.raises(GenerationError, match="out of range"):
        pipe.complete([1, 99999], max_new_tokens=3)
    with pytest.raises(GenerationError, match="unknown sampling options"):
        pipe.complete("Hi", max_new_tokens=3, temprature=0.5)
    with pytest.raises(GenerationError, match="top_p"):
        pipe.complete("Hi", max_new_tokens=3, top_p=1.5)
    with pytest.raises(CapabilityError, match="cannot describe images"):
        pipe.describe("x.png")
    with pytest.raises(CapabilityError, match="cannot generate images"):
        pipe.generate("a red circle")
