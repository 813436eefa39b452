"""`mmstack bench` plumbing on the tiny "smoke" size: every suite runs through the real command line, its
correctness gate passes, and the JSON carries the fields the README tables are made from. No timing is
asserted here: performance claims live in the benchmark output (docs/performance.md)."""
from __future__ import annotations

import json

import pytest
import torch

from mmstack.apps import bench, bench_measure, bench_suites
from mmstack.apps.cli import main

ROW_FIELDS = {"impl", "prefill_tok_s", "decode_ms_per_token", "e2e_s", "peak_mem_bytes", "kv_bytes_per_token",
              "phases_s", "runs_e2e_s"}


@pytest.mark.parametrize("suite", sorted(bench_suites.SUITES))
def test_bench_suite_runs_gated_and_writes_json(suite, tmp_path, capsys):
    out = tmp_path / f"{suite}.json"
    rc = main(["bench", suite, "--size", "smoke", "--repeat", "2", "--warmup", "0", "--device", "cpu",
               "--threads", str(torch.get_num_threads()), "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert f"suite {suite}" in printed and "ours/theirs" in printed and "machine:" in printed
    (result,) = json.loads(out.read_text())["results"]
    assert result["suite"] == suite and result["size"] == "smoke" and result["dtype"] == "float32"
    assert {"date", "cpu", "torch", "transformers", "torch_threads"} <= set(result["env"])
    assert result["cases"]
    for case in result["cases"]:
        assert case["gate"] and all(g["ok"] for g in case["gate"])
        assert len(case["rows"]) >= 2
        for row in case["rows"]:
            assert ROW_FIELDS <= set(row) and len(row["runs_e2e_s"]) == 2 and row["e2e_s"] > 0
            assert row["kv_bytes_per_token"] > 0
        ratio = case["ratio"]
        assert ratio["against"] == case["rows"][1]["impl"] or ratio["against"] in {r["impl"] for r in case["rows"][1:]}
        assert ratio["e2e_s"] > 0 and ratio["speedup_e2e"] == pytest.approx(1 / ratio["e2e_s"])


def test_mla_bench_reports_the_latent_cache_size(tmp_path):
    (result,) = bench.run_suites(["mla-moe-decode"], size="smoke", device="cpu", repeat=1, warmup=0)
    c = bench_suites.MLA_SIZES["smoke"]["cfg"]
    ours = result["cases"][0]["rows"][0]
    assert ours["kv_bytes_per_token"] == (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * c["num_hidden_layers"] * 4


def test_failed_gate_times_nothing_and_exits_1(monkeypatch, capsys):
    calls = []

    def fake_suite(size, device, dtype, against):
        def side(value):
            def run():
                calls.append(value)
                return torch.tensor([value]), {}
            return run

        ours, theirs = bench_measure.Contender("ours", side(1)), bench_measure.Contender("theirs", side(2))
        return [bench_measure.Case("c", ours, [theirs], gate=lambda a, b: (torch.equal(a, b), "tokens differ"))]

    monkeypatch.setitem(bench_suites.SUITES, "janus-t2i", fake_suite)
    assert main(["bench", "janus-t2i", "--size", "smoke", "--device", "cpu"]) == 1
    assert "correctness gate failed" in capsys.readouterr().out and calls == [1, 2]


def test_bench_rejects_too_few_repeats_and_unknown_suites():
    with pytest.raises(ValueError, match="at least 5"):
        bench.run_suites(["janus-t2i"], size="cpu", repeat=3)
    with pytest.raises(ValueError, match="unknown suite"):
        bench.run_suites(["nope"], size="smoke")


def test_bench_quant_reports_memory_speed_drift_and_trained_scores(tmp_path, capsys):
    out = tmp_path / "quant.json"
    assert main(["bench", "quant", "--size", "smoke", "--repeat", "2", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "suite quant" in printed and "embedded model" in printed
    (result,) = json.loads(out.read_text())["results"]
    lm = [r for r in result["rows"] if r["workload"].startswith("lm")]
    demo = [r for r in result["rows"] if "scores" in r]
    assert [r["scheme"] for r in lm] == ["float32", "int8", "int4"] == [r["scheme"] for r in demo]
    base, q8, q4 = lm
    assert base["logits_rel_err"] == 0 and base["greedy_agree"] == "8/8"
    assert q4["weight_mb"] < q8["weight_mb"] < base["weight_mb"]  # measured, not asserted as a speed
    assert 0 < q8["logits_rel_err"] < q4["logits_rel_err"] < 1
    assert all(len(r["decode_spread"]) == 2 and r["decode_ms"] > 0 for r in lm)
    assert set(demo[0]["scores"]) >= {"ocr", "chart", "caption", "grounding", "t2i"}


def test_mla_bench_runs_a_config_file_and_chosen_prompt_lengths(tmp_path):
    cfg = tmp_path / "config.json"  # fields of a hub config.json; checkpoint-only keys are ignored
    cfg.write_text(json.dumps({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                               "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}))
    (result,) = bench.run_suites(["mla-moe-decode"], size="smoke", device="cpu", repeat=1, warmup=0,
                                 config=str(cfg), prompts=[12, 20], new_tokens=4)
    assert [c["case"] for c in result["cases"]] == ["prompt=12,new=4", "prompt=20,new=4"]
    assert "4 experts of 8 (top-2" in " ".join(result["cases"][0]["notes"])
    with pytest.raises(ValueError, match="mla-moe-decode suite alone"):
        bench.run_suites(["janus-t2i"], size="smoke", config=str(cfg))
    cfg.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON object"):
        bench.run_suites(["mla-moe-decode"], size="smoke", config=str(cfg))


@pytest.mark.parametrize("args", [["--prompts", "abc"], ["--prompts", "64,0"], ["--new-tokens", "-3"]])
def test_bench_case_shapes_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "mla-moe-decode", "--size", "smoke", *args])
    assert e.value.code == 2 and "argument" in capsys.readouterr().err


def test_bench_refuses_cases_beyond_the_context_before_building():
    with pytest.raises(ValueError, match="exceed the config's max_position_embeddings"):
        bench.run_suites(["mla-moe-decode"], size="smoke", prompts=[9000], new_tokens=8)


def test_bench_serve_drives_the_real_server_over_http(tmp_path, capsys):
    """The serve suite starts `mmstack serve` with the command's own flags (so new flags keep working) and
    measures streaming chat requests through HTTP."""
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--size", "smoke", "--repeat", "2", "--device", "cpu", "--json", str(out)]) == 0
    assert "suite serve" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert [r["concurrency"] for r in result["rows"]] == [1, 4]
    for r in result["rows"]:
        assert r["req_s"] > 0 and r["tok_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p95_s"]
        assert r["req_s_spread"][0] <= r["req_s"] <= r["req_s_spread"][1]


def test_a_config_too_large_for_memory_is_refused_before_anything_is_built(monkeypatch):
    built = []
    monkeypatch.setattr(bench_measure, "available_bytes", lambda device: 10 * 2**20)  # 10 MiB free
    monkeypatch.setattr("transformers.DeepseekV2ForCausalLM._from_config", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=r"needs about .* GiB of host memory, 0.0 GiB is available"):
        bench.run_suites(["mla-moe-decode"], size="cpu", device="cpu", repeat=5)
    assert not built
