"""Kept for one release: the benchmark suites moved to `mmstack.apps.bench_suites`. Import from there."""
from mmstack.apps.bench_suites import (FLOW_SIZES, JANUS_SIZES, MLA_SIZES, SUITES, VL2_SIZES, hf_kv_bytes_per_token,
                                       janus_t2i, janusflow_t2i, mla_moe_decode, vl2_prefill)

__all__ = ["FLOW_SIZES", "JANUS_SIZES", "MLA_SIZES", "SUITES", "VL2_SIZES", "hf_kv_bytes_per_token", "janus_t2i",
           "janusflow_t2i", "mla_moe_decode", "vl2_prefill"]
