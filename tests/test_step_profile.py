"""benchmarks/step_profile.py sorts each XLA:CPU op into the group its time is reported under."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import step_profile  # noqa: E402

HLO = """HloModule jit_step, is_scheduled=true

%fused_reduce (param_0: f32[8,16]) -> f32[8] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %constant = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0, %constant), dimensions={1}, to_apply=%add
}

%fused_silu (param_0.1: f32[8,16]) -> f32[8,16] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  %logistic = f32[8,16]{1,0} logistic(%param_0.1)
  ROOT %multiply = f32[8,16]{1,0} multiply(%param_0.1, %logistic)
}

%fused_transpose (param_0.2: f32[16,8]) -> f32[8,16] {
  %param_0.2 = f32[16,8]{1,0} parameter(0)
  ROOT %transpose.2 = f32[8,16]{1,0} transpose(%param_0.2), dimensions={1,0}
}

%body (arg_tuple: (s32[], f32[8,16], /*index=2*/f32[8])) -> (s32[], f32[8,16], f32[8]) {
  %arg_tuple = (s32[], f32[8,16]{1,0}, f32[8]{0}) parameter(0)
  ROOT %tuple.9 = (s32[], f32[8,16]{1,0}, f32[8]{0}) tuple(%arg_tuple)
}

ENTRY %main.5 (x: f32[8,16], w: f32[3,3,16,16]) -> f32[8] {
  %x = f32[8,16]{1,0} parameter(0)
  %ffi_call.3 = f32[8,16]{1,0} custom-call(%x, %w), custom_call_target="dpdm_onednn_conv_forward", api_version=API_VERSION_TYPED_FFI
  %silu_fusion = f32[8,16]{1,0} fusion(%ffi_call.3), kind=kLoop, calls=%fused_silu
  %transpose_fusion = f32[8,16]{1,0} fusion(%x), kind=kLoop, calls=%fused_transpose
  %dot.7 = f32[8,8]{1,0} dot(%silu_fusion, %transpose_fusion), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %while.4 = (s32[], f32[8,16]{1,0}, f32[8]{0}) while(%tuple), condition=%cond, body=%body
  ROOT %reduce_fusion = f32[8]{0} fusion(%silu_fusion), kind=kInput, calls=%fused_reduce
}
"""


def test_ops_are_sorted_into_groups():
    groups = step_profile.parse_hlo(HLO)
    assert groups["ffi_call.3"] == "conv_onednn"
    assert groups["silu_fusion"] == "elementwise"
    assert groups["transpose_fusion"] == "layout"
    assert groups["dot.7"] == "dot"
    assert groups["reduce_fusion"] == "reduce"
    assert groups["while.4"] == "control"  # its body's thunks are timed on their own: not summed twice
