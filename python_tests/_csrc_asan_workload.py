"""Run by test_cuda_emu.py under AddressSanitizer: csrc's ops on exactly sized CPU tensors (no slack after
any of them), so a kernel that reads or writes one element past a tensor, its shared memory or a thread's
arrays is reported. argv[1]: the sanitized build of tools/cuda_emu. Prints one line per op family."""

import sys

import torch

torch.ops.load_library(sys.argv[1])
op = torch.ops.mmkernels_C
gen = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


count = 0
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for rows, n in ((1, 17), (3, 4095), (3, 4096), (2, 8192), (2, 65536 if dtype != torch.float32 else 16384)):
        for wdtype in {dtype, torch.float32}:
            x, w, dy = rnd(rows, n, dtype=dtype), rnd(n, dtype=wdtype), rnd(rows, n, dtype=dtype)
            y, h, rstd = op.rms_norm_fwd(x, None, w, 1e-6)
            y, h, rstd = op.rms_norm_fwd(x, rnd(rows, n, dtype=dtype), w, 1e-6)
            op.rms_norm_bwd(dy, h, w, rstd, None)
            op.rms_norm_bwd(dy, h, w, rstd, rnd(rows, n, dtype=dtype))
            count += 4
print(f"rms_norm: {count} launches", flush=True)

count = 0
# (B, T, S, H, H_kv, D, L_p, prompt batch, kv_start)
for b, t, s, h, hkv, d, lp, bp, starts in (
    (1, 1, 1, 1, 1, 64, 0, 1, None),
    (2, 1, 37, 4, 2, 64, 10, 1, None),
    (3, 1, 200, 8, 2, 128, 1, 3, (0, 17, 199)),
    (2, 16, 40, 8, 2, 64, 64, 2, (0, 39)),
    (1, 5, 1000, 4, 1, 128, 128, 1, (333,)),
    (2, 3, 129, 4, 4, 64, 3, 2, (128, 0)),
):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = rnd(b, t, h, d, dtype=dtype), rnd(b, s, hkv, d, dtype=dtype), rnd(b, s, hkv, d, dtype=dtype)
        kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32)
        op.decode_attention(q, k, v, None, None, None, kv_start, d ** -0.5, True)
        if lp:
            pk, pv = rnd(bp, lp, hkv, d, dtype=dtype), rnd(bp, lp, hkv, d, dtype=dtype)
            op.decode_attention(q, k, v, pk, pv, rnd(h), kv_start, d ** -0.5, True)
            op.decode_attention(q, k, v, pk, pv, rnd(1), kv_start, d ** -0.5, False)
            count += 2
        count += 1
print(f"decode_attention: {count} launches", flush=True)

count = 0
for d_out, d_in, r in ((1, 1, 1), (37, 40, 5), (37, 40, 17), (64, 300, 16), (5, 8, 8)):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for column_major in (False, True):
            weight = rnd(d_out, d_in, dtype=dtype)
            if column_major:
                weight = weight.t().contiguous().t()
            idx = torch.randperm(d_in, generator=gen)[:r]
            orig = weight[:, idx].contiguous()
            state = [rnd(d_out, r) for _ in range(3)] + [rnd(d_out, r).abs()]
            op.paca_adamw_sync(weight, orig, idx, 2.0, state[0], state[1], state[2], state[3], 3.0, 1e-2, 0.9,
                               0.999, 1e-8, 0.01)
            count += 1
print(f"paca_adamw_sync: {count} launches", flush=True)
