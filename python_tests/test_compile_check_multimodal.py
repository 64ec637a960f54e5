"""tools/compile_check.py for Compacter, LaVIN and HyperLLaVA (text and images): their kernels compile for
Hopper and fit its limits (the other methods: test_compile_check.py)."""

from test_compile_check import assert_compiled, run_check


def test_adapter_family_compiles_for_hopper():
    # generation and packed attention: test_compile_check.py's run has them
    assert_compiled(run_check("--methods", "compacter,lavin,hyperllava", "--training-only"), (
        "_phm_adapter_fwd_kernel", "_phm_adapter_bwd_kernel", "_mom_fwd_kernel", "_mom_bwd_kernel", "_fwd_kernel",
        "_bwd_rows_kernel", "_bwd_weights_kernel"))
