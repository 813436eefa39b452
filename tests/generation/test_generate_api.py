"""`pipe.generate` input checking (clear errors, nothing produced), progress reporting, and the VAE
requirement of the flow path."""
from __future__ import annotations

import shutil

import pytest

import mmstack
from golden import golden_dir, tokenizer_for
from mmstack.api import CapabilityError
from mmstack.decoding import GenerationError


@pytest.fixture(scope="module")
def janus():
    d = golden_dir() / "janus_pro_tiny"
    return mmstack.load(d, device="cpu", tokenizer=tokenizer_for(d))


@pytest.fixture(scope="module")
def flow():
    d = golden_dir() / "janusflow_tiny"
    return mmstack.load(d, device="cpu", tokenizer=tokenizer_for(d))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "empty prompt"),
    (dict(prompt="   "), "empty prompt"),
    (dict(prompt="x", n=0), "n must be"),
    (dict(prompt="x", n=10_000), "n must be"),
    (dict(prompt="x", cfg=-1.0), "cfg must be"),
    (dict(prompt="x", temperature=-0.5), "temperature must be"),
    (dict(prompt="x", size=(64, 32)), "square"),
    (dict(prompt="x", size=512), "generates 64x64"),
    (dict(prompt="x", steps=5), "steps applies to flow"),
    (dict(prompt="x", mode="flow"), "unavailable"),
])
def test_vq_generate_rejects_bad_input(janus, kwargs, match):
    prompt = kwargs.pop("prompt")
    with pytest.raises((GenerationError, CapabilityError), match=match):
        janus.generate(prompt, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be"),
    (dict(steps=-3), "steps must be"),
    (dict(temperature=0.7), "temperature applies to VQ"),
    (dict(size=128), "generates 64x64"),
])
def test_flow_generate_rejects_bad_input(flow, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        flow.generate("a cat", **kwargs)


def test_prompt_longer_than_the_context_is_refused(janus):
    with pytest.raises(GenerationError, match="exceeds the context"):
        janus.generate("word " * 2000)


def test_progress_reports_every_token(janus):
    seen = []
    janus.generate("a cat", progress=lambda done, total: seen.append((done, total)))
    n = (janus.model.cfg.parts["vq_head"].image_size // janus.model.vq.cfg.downsample) ** 2
    assert seen[-1] == (n, n) and [d for d, _ in seen] == list(range(1, n + 1))


def test_greedy_vq_generation_is_deterministic_without_a_seed(janus):
    a = janus.generate("a cat", temperature=0)[0]
    assert a.tobytes() == janus.generate("a cat", temperature=0)[0].tobytes()


def test_flow_without_a_vae_explains_how_to_provide_one(tmp_path):
    src = golden_dir() / "janusflow_tiny"
    d = tmp_path / "flow"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json"):
        shutil.copy(src / name, d / name)
    pipe = mmstack.load(d, device="cpu", tokenizer=tokenizer_for(src))
    with pytest.raises(CapabilityError, match="vae=DIR"):
        pipe.generate("a cat", steps=1)
    pipe2 = mmstack.load(d, device="cpu", tokenizer=tokenizer_for(src), vae=src)
    assert pipe2.generate("a cat", steps=1, seed=0)[0].size == (64, 64)


def test_understanding_only_model_cannot_generate():
    pipe = mmstack.load(golden_dir() / "vl2_tiny_mha_moe", device="cpu", tokenizer=golden_dir() / "vl2_tokenizer")
    with pytest.raises(CapabilityError, match="cannot generate images"):
        pipe.generate("a cat")
