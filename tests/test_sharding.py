"""Every device does 1/N of the step: the HLO reader (jaxllm.hlo) on hand-made programs, then the compiled
train step on 4 simulated devices against 1 device (per-device FLOPs, collective bytes, losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import hlo, sharding


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_collective_in_a_scan_counts_once_per_iteration_and_nested_loops_multiply():
    mesh = sharding.make_mesh(4)

    def body(w_DxF, x_KxBxD):
        def outer(total_F, x_BxD):
            def inner(t_F, i):  # 2 trips inside each of the 3 outer ones: 6 all-reduces of F floats
                return t_F + jax.lax.psum(jnp.sum(x_BxD @ w_DxF, 0) * i, "data"), None
            t_F, _ = jax.lax.scan(inner, total_F, jnp.arange(2.0))
            return t_F, None
        total_F, _ = jax.lax.scan(outer, jnp.zeros((w_DxF.shape[1],)), x_KxBxD)
        gathered_BxF = jax.lax.all_gather(x_KxBxD[0] @ w_DxF, "data", tiled=True)  # once, outside the loops
        return jax.lax.psum(total_F, "data"), gathered_BxF

    step = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "data")), out_specs=(P(), P()), check_vma=False)
    compiled = _compiled(step, jnp.ones((8, 16)), jnp.ones((3, 8, 8)))
    text = compiled.as_text()
    assert "known_trip_count" in text
    got = hlo.collective_bytes(text)
    # 6 in the loops + 1 after, each of 16 float32; the all-gather's result is the global [8, 16] float32.
    assert got["all-reduce"] == (6 + 1) * 16 * 4
    assert got["all-gather"] == 8 * 16 * 4
    assert got["reduce-scatter"] == got["all-to-all"] == got["collective-permute"] == 0
    assert hlo.collective_counts(text)["all-reduce"] == 7
    assert hlo.flops_per_device(compiled) > 0


def test_trip_count_falls_back_to_the_loop_condition_constant():
    text = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p.1 = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element(%p.1), index=1
  %ar = f32[4]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  %j = s32[] get-tuple-element(%p.1), index=0
  ROOT %t = (s32[], f32[4]{0}) tuple(%j, %ar)
}

ENTRY %main (a: f32[4]) -> f32[16] {
  %a = f32[4]{0} parameter(0)
  %z = s32[] constant(0)
  %t.1 = (s32[], f32[4]{0}) tuple(%z, %a)
  %w = (s32[], f32[4]{0}) while(%t.1), condition=%cond, body=%body
  %r = f32[4]{0} get-tuple-element(%w), index=1
  ROOT %g = f32[16]{0} all-gather(%r), dimensions={0}, replica_groups={{0,1,2,3}}
}
"""
    got = hlo.collective_bytes(text)
    assert got["all-reduce"] == 5 * 4 * 4 and got["all-gather"] == 16 * 4
