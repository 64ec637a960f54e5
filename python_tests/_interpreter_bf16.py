"""bfloat16 in the Triton interpreter as a GPU computes it, for tests on CPU.

Triton 3.9's interpreter holds bfloat16 as its raw 16 bits (numpy has no bfloat16) and gets two things
wrong with them: a float32 -> bfloat16 cast truncates (a GPU rounds to nearest even), and `tl.dot` multiplies
the raw bits as integers. `install()` (conftest.py, on a machine without a GPU) replaces the builder's casts
with round-to-nearest-even through float32, and runs `tl.dot` on float32 copies of bfloat16 operands (exact:
a bfloat16 product fits a float32, as in the tensor cores' float32 accumulation). Any other bfloat16
arithmetic or reduction on raw bits raises, so a kernel that does some cannot pass by accident.
"""

import contextlib

import numpy as np


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    quiet_nan = ((u >> 16) | np.uint32(0x40)).astype(np.uint16)
    return np.where(np.isnan(np.asarray(x, dtype=np.float32)), quiet_nan, rounded)


_SAVED = {}


def install() -> None:
    """Patches triton's interpreter in this process (once); `uninstall()` puts it back."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    if _SAVED:
        return
    builder = interp.InterpreterBuilder
    handle = interp.TensorHandle
    reduce_scan = interp.ReduceScanOpInterface
    saved = {name: getattr(builder, name) for name in ("cast_impl", "create_fp_to_fp", "create_dot", "binary_op",
                                                        "unary_op")}

    def as_f32(h):
        return bf16_bits_to_f32(h.data) if h.dtype.scalar == tl.bfloat16 else h.data.astype(np.float32)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.bfloat16 and dst_ty != tl.bfloat16:
            return handle(bf16_bits_to_f32(src.data).astype(interp._get_np_dtype(dst_type)), dst_ty)
        if dst_ty == tl.bfloat16 and src_ty != tl.bfloat16:
            return handle(f32_to_bf16_bits(src.data.astype(np.float32)), dst_ty)
        return saved["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if tl.bfloat16 in (src.dtype.scalar, dst_type.scalar):
            return cast_impl(self, src, dst_type)
        return saved["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            out = np.matmul(as_f32(a), as_f32(b), dtype=np.float32)
            return handle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return saved["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if tl.bfloat16 in (lhs.dtype.scalar, rhs.dtype.scalar):
            raise NotImplementedError(f"bfloat16 arithmetic ({op}) on raw bits in the interpreter")
        return saved["binary_op"](self, lhs, rhs, op)

    def unary_op(self, arg, op):
        if arg.dtype.scalar == tl.bfloat16:
            raise NotImplementedError(f"bfloat16 arithmetic ({op}) on raw bits in the interpreter")
        return saved["unary_op"](self, arg, op)

    def apply(self, input):
        tensors = input if isinstance(input, tuple) else (input,)
        if any(getattr(t, "dtype", None) is not None and t.dtype.scalar == tl.bfloat16 for t in tensors):
            raise NotImplementedError("a reduction or scan of bfloat16 raw bits in the interpreter")
        return saved_apply(self, input)

    saved_apply = reduce_scan.apply
    for name, fn in (("cast_impl", cast_impl), ("create_fp_to_fp", create_fp_to_fp), ("create_dot", create_dot),
                     ("binary_op", binary_op), ("unary_op", unary_op)):
        _SAVED[(builder, name)] = saved[name]
        setattr(builder, name, fn)
    _SAVED[(reduce_scan, "apply")] = saved_apply
    reduce_scan.apply = apply


def uninstall() -> None:
    for (owner, name), fn in _SAVED.items():
        setattr(owner, name, fn)
    _SAVED.clear()


@contextlib.contextmanager
def removed():
    """The interpreter as Triton ships it, inside the block."""
    uninstall()
    try:
        yield
    finally:
        install()
