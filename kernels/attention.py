"""Flash-style softmax attention (non-causal) in Triton, forward and backward.

    S = scale · Q Kᵀ            (N × N per (batch, head), never stored)
    P = softmax_rows(S)
    O = P V
    L = logsumexp_rows(S)       (fp32, saved for backward with O only)

Forward: one program per tile (query block, batch·head), or a persistent grid of a few
programs per SM looping over the tiles in one flattened, software-pipelined loop (so the
next tile's loads overlap the current tile's last blocks; a tuning candidate). In half
precision q, k, v and o can also move through the tensor memory accelerator of sm_90 and
later (tensor descriptors, `ForwardConfig.tma`; a tuning candidate). Each tile streams key
blocks with the online softmax in base 2 (qk_scale = scale·log2(e), exp2 instead of exp;
scale > 0).
With x = q·k the raw dot products, per query row:
    m' = max(m, rowmax(x)),  α = 2^((m − m')·qk_scale),  p = 2^((x − m')·qk_scale),
    ℓ' = α ℓ + rowsum(p),  acc' = α acc + p V,  O = acc / ℓ,  L = scale·m + ln ℓ.
Subtracting the max before scaling keeps large logits' rounding out of the exponent.

Backward (P = 2^((x − L/scale)·qk_scale) recomputed, nothing N × N in memory, no atomics):
    Δ  = rowsum(dO ∘ O)                          (preprocessing kernel)
    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − Δ)
    dQ = scale · dS K,   dK = scale · dSᵀ Q
Each backward program owns one key block (dK, dV: loop over all query blocks) and the
query block with the same index (dQ: loop over all key blocks), so every output element
is written by exactly one program, deterministically. When the whole sequence fits in one
tile (N ≤ 64) a single program per (batch, head) computes Δ, dQ, dK and dV from one
recomputed P (5 products instead of 7, one launch instead of two).

fp32 inputs use full-precision dots (input_precision="ieee"); fp16/bf16 use tensor cores
with fp32 accumulation, P and dS rounded to the input dtype before their products.

Public API: `attention(q, k, v, scale=None)` on (B, H, N, D) tensors, its eager reference
`attention_reference`, and `attention_qkv_nchw(qkv, num_heads, scale=None)`, which reads
a (B, 3C, H, W) qkv 1×1-conv output in place and writes (B, C, H, W).
Custom ops (torch.library, namespace dream_kernels): attention_forward,
attention_backward, attention_qkv_nchw_forward, attention_qkv_nchw_backward.

Without a GPU, set TRITON_INTERPRET=1 before importing this module to run the kernels on
CPU tensors (fp32 and fp16; the interpreter computes bf16 dots wrongly, so bf16 on CPU
is refused).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4: no host-side tensor descriptors, the forward loads through pointers
    TensorDescriptor = None

from kernels import autotune
from kernels.device import (check_interpreter_device, is_int, is_interpreted, is_real, on_tensor_device,
                            reject_function_transforms)
from kernels.device import sm_count as _sm_count  # module global: tests and tools substitute it
from kernels.dispatch import OpCall
from kernels.layout import INT32_MAX, cdiv, memory_format_of, next_power_of_2, span

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_MAX_SEQUENCE = 4096
_LOG2E = 1.4426950408889634
# scales that are normal fp32 numbers (a GPU flushes subnormals to zero) with 1/scale and scale·log2(e) finite
_SCALE_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max / (2 * _LOG2E))


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _exp2_shifted(x, shift, qk_scale, PRECISE: tl.constexpr):
    """2^((x − shift)·qk_scale) with `shift` broadcastable to x (a row or column vector).
    PRECISE (fp32): subtract first, so the large logits' rounding stays out of the
    exponent; otherwise one FMA per element, x·qk_scale − shift·qk_scale."""
    if PRECISE:
        return tl.exp2((x - shift) * qk_scale)
    else:
        return tl.exp2(x * qk_scale - shift * qk_scale)


@triton.jit
def _attention_forward_tile(
    tile, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_desc, k_desc, v_desc, o_desc,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, seq_len, num_query_blocks, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr, USE_TMA: tl.constexpr,
):
    # Tile = (query block, batch·head); query blocks of one head are adjacent.
    # USE_TMA: q, k, v, o move as [1, 1, rows, HEAD_DIM] boxes of their (B, H, N, D) tensor descriptors
    # (Hopper's tensor memory accelerator; rows past N load as zeros and are not stored), not pointers.
    pid = tile
    block_m = pid % num_query_blocks
    bh = pid // num_query_blocks
    b32 = bh // num_heads
    h32 = bh % num_heads
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    o_ptr += b * stride_ob + h * stride_oh

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    if USE_TMA:
        q = q_desc.load([b32, h32, block_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    elif EVEN_M:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_len, other=0.0)

    # Invariant after each key block, with x = q·k the raw dot products (scale > 0):
    #   m = running row max of x,  l = Σ_j 2^((x_j − m)·qk_scale),  acc = Σ_j 2^((x_j − m)·qk_scale) v_j.
    # Subtracting m before scaling keeps the exponent's rounding error small for the
    # dominant keys even when the logits are large.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        key_idx = start_n + offs_n
        k_ptrs = k_ptr + key_idx[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_ptr + key_idx[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if USE_TMA:
            k = k_desc.load([b32, h32, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = v_desc.load([b32, h32, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif EVEN_N:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=key_idx[:, None] < seq_len, other=0.0)
            v = tl.load(v_ptrs, mask=key_idx[:, None] < seq_len, other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if not EVEN_N:
            x = tl.where(key_idx[None, :] < seq_len, x, float("-inf"))
        # Every key block holds at least one valid key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.exp2((m_i - m_new) * qk_scale)
        p = _exp2_shifted(x, m_new[:, None], qk_scale, PRECISE)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    # Natural-log logsumexp of the logits scale·x: L = scale·m + ln(l).
    lse = m_i * scale + tl.log2(l_i) * 0.6931471805599453
    o_ptrs = o_ptr + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    lse_ptrs = lse_ptr + bh.to(tl.int64) * seq_len + offs_m
    if USE_TMA:
        o_desc.store([b32, h32, block_m * BLOCK_M, 0],
                     acc.to(o_ptr.dtype.element_ty).reshape(1, 1, BLOCK_M, HEAD_DIM))
    elif EVEN_M:
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty))
    else:
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < seq_len)
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < seq_len)


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_desc, k_desc, v_desc, o_desc,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    num_heads, seq_len, num_query_blocks, num_tiles, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr, PERSISTENT: tl.constexpr, USE_TMA: tl.constexpr,
):
    # One program per tile, or (PERSISTENT) a capped grid whose programs take tiles pid, pid + grid,
    # pid + 2·grid, ...: with pointer loads the loop nest over (tile, key block) is flattened into one
    # software-pipelined loop, so the next tile's first loads are in flight while the current tile
    # finishes; with tensor descriptors (USE_TMA) only the key loop is pipelined (Triton 3.6 fails to
    # compile the flattened nest with descriptor loads for sm_90).
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=not USE_TMA):
            _attention_forward_tile(
                tile, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_desc, k_desc, v_desc, o_desc,
                stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
                num_heads, seq_len, num_query_blocks, scale, qk_scale,
                HEAD_DIM, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N, DOT_PRECISION, PRECISE, USE_TMA)
    else:
        _attention_forward_tile(
            tl.program_id(0), q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_desc, k_desc, v_desc, o_desc,
            stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
            num_heads, seq_len, num_query_blocks, scale, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N, DOT_PRECISION, PRECISE, USE_TMA)


@triton.jit
def _attention_backward_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    num_heads, seq_len, num_row_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Δ[row] = Σ_d dO[row, d] · O[row, d], in fp32.
    pid = tl.program_id(0)
    block_m = pid % num_row_blocks
    bh = pid // num_row_blocks
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seq_len
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh
                + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=row_ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * seq_len + offs_m, tl.sum(o * do, 1),
             mask=offs_m < seq_len)


@triton.jit
def _backward_dk_dv_block(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
    stride_don, stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
    seq_len, key_start, scale, qk_scale, inv_scale,
    HEAD_DIM: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_LOOP: tl.constexpr,
    EVEN_OWN: tl.constexpr, EVEN_LOOP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr,
):
    """dK, dV of key rows [key_start, key_start + BLOCK_OWN) of one (batch, head), whose
    base pointers are given: loop over all query blocks (the columns of Pᵀ)."""
    offs_d = tl.arange(0, HEAD_DIM)
    keys = key_start + tl.arange(0, BLOCK_OWN)
    keys_ok = keys[:, None] < seq_len
    k_ptrs = k_ptr + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_ptr + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if EVEN_OWN:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=keys_ok, other=0.0)
        v = tl.load(v_ptrs, mask=keys_ok, other=0.0)
    dk = tl.zeros([BLOCK_OWN, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_OWN, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, seq_len, BLOCK_LOOP):
        rows = start_m + tl.arange(0, BLOCK_LOOP)
        q_ptrs = q_ptr + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
        do_ptrs = do_ptr + rows[:, None] * stride_don + offs_d[None, :] * stride_dod
        if EVEN_LOOP:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse_x = tl.load(lse_ptr + rows) * inv_scale
            delta = tl.load(delta_ptr + rows)
        else:
            rows_ok = rows < seq_len
            q = tl.load(q_ptrs, mask=rows_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=rows_ok[:, None], other=0.0)
            # Padded query rows get L = +inf, so their column of Pᵀ is exactly 0.
            lse_x = tl.load(lse_ptr + rows, mask=rows_ok, other=float("inf")) * inv_scale
            delta = tl.load(delta_ptr + rows, mask=rows_ok, other=0.0)
        # Pᵀ[key, row] = exp(scale·k·q − L[row]) = 2^((k·q − L[row]/scale)·qk_scale)
        p_t = _exp2_shifted(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION),
                            lse_x[None, :], qk_scale, PRECISE)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk = dk * scale
    dk_ptrs = dk_ptr + keys[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = dv_ptr + keys[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    if EVEN_OWN:
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=keys_ok)
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=keys_ok)


@triton.jit
def _backward_dq_block(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
    stride_don, stride_dod, stride_dqn, stride_dqd,
    seq_len, row_start, scale, qk_scale, inv_scale,
    HEAD_DIM: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_LOOP: tl.constexpr,
    EVEN_OWN: tl.constexpr, EVEN_LOOP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr,
):
    """dQ of query rows [row_start, row_start + BLOCK_OWN) of one (batch, head), whose
    base pointers are given: loop over all key blocks."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = row_start + tl.arange(0, BLOCK_OWN)
    rows_ok = rows < seq_len
    q_ptrs = q_ptr + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = do_ptr + rows[:, None] * stride_don + offs_d[None, :] * stride_dod
    if EVEN_OWN:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse_x = tl.load(lse_ptr + rows) * inv_scale
        delta = tl.load(delta_ptr + rows)
    else:
        q = tl.load(q_ptrs, mask=rows_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=rows_ok[:, None], other=0.0)
        lse_x = tl.load(lse_ptr + rows, mask=rows_ok, other=float("inf")) * inv_scale
        delta = tl.load(delta_ptr + rows, mask=rows_ok, other=0.0)
    dq = tl.zeros([BLOCK_OWN, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_LOOP):
        keys = start_n + tl.arange(0, BLOCK_LOOP)
        k_ptrs = k_ptr + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_ptr + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if EVEN_LOOP:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=keys[:, None] < seq_len, other=0.0)
            v = tl.load(v_ptrs, mask=keys[:, None] < seq_len, other=0.0)
        # P[row, key] = 2^((q·k − L[row]/scale)·qk_scale); dS = P ∘ (dO Vᵀ − Δ)
        p = _exp2_shifted(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION),
                          lse_x[:, None], qk_scale, PRECISE)
        if not EVEN_LOOP:
            p = tl.where(keys[None, :] < seq_len, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq = dq * scale
    dq_ptrs = dq_ptr + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    if EVEN_OWN:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=rows_ok[:, None])


@triton.jit
def _attention_backward_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, seq_len, num_blocks, scale, qk_scale, inv_scale,
    HEAD_DIM: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_LOOP: tl.constexpr,
    EVEN_OWN: tl.constexpr, EVEN_LOOP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr,
):
    # Program = (block index j, batch·head). It writes dK, dV of key rows
    # [j·BLOCK_OWN, (j+1)·BLOCK_OWN) and dQ of the query rows with the same range.
    pid = tl.program_id(0)
    block_j = pid % num_blocks
    bh = pid // num_blocks
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    do_ptr += b * stride_dob + h * stride_doh
    lse_ptr += bh.to(tl.int64) * seq_len
    delta_ptr += bh.to(tl.int64) * seq_len
    _backward_dk_dv_block(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
        dk_ptr + b * stride_dkb + h * stride_dkh, dv_ptr + b * stride_dvb + h * stride_dvh,
        stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_don, stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
        seq_len, block_j * BLOCK_OWN, scale, qk_scale, inv_scale,
        HEAD_DIM, BLOCK_OWN, BLOCK_LOOP, EVEN_OWN, EVEN_LOOP, DOT_PRECISION, PRECISE,
    )
    _backward_dq_block(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
        dq_ptr + b * stride_dqb + h * stride_dqh,
        stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_don, stride_dod, stride_dqn, stride_dqd,
        seq_len, block_j * BLOCK_OWN, scale, qk_scale, inv_scale,
        HEAD_DIM, BLOCK_OWN, BLOCK_LOOP, EVEN_OWN, EVEN_LOOP, DOT_PRECISION, PRECISE,
    )


@triton.jit
def _attention_backward_single_tile_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    num_heads, seq_len, scale, qk_scale, inv_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr,
):
    # One program per (batch, head); all N ≤ BLOCK queries and keys in one tile.
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_ok = offs < seq_len
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_ptrs = k_ptr + b * stride_kb + h * stride_kh + offs[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_ptr + b * stride_vb + h * stride_vh + offs[:, None] * stride_vn + offs_d[None, :] * stride_vd
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs[:, None] * stride_on + offs_d[None, :] * stride_od
    do_ptrs = do_ptr + b * stride_dob + h * stride_doh + offs[:, None] * stride_don + offs_d[None, :] * stride_dod
    lse_ptrs = lse_ptr + bh.to(tl.int64) * seq_len + offs
    if EVEN:
        q = tl.load(q_ptrs)
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        o = tl.load(o_ptrs)
        do = tl.load(do_ptrs)
        lse_x = tl.load(lse_ptrs) * inv_scale
    else:
        q = tl.load(q_ptrs, mask=rows_ok[:, None], other=0.0)
        k = tl.load(k_ptrs, mask=rows_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=rows_ok[:, None], other=0.0)
        o = tl.load(o_ptrs, mask=rows_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=rows_ok[:, None], other=0.0)
        lse_x = tl.load(lse_ptrs, mask=rows_ok, other=float("inf")) * inv_scale
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # Δ = rowsum(dO ∘ O)
    p = _exp2_shifted(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), lse_x[:, None],
                      qk_scale, PRECISE)
    if not EVEN:
        p = tl.where(rows_ok[None, :], p, 0.0)  # padded keys; padded query rows are 0 via L=+inf
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * scale
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * scale

    dq_ptrs = dq_ptr + b * stride_dqb + h * stride_dqh + offs[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    dk_ptrs = dk_ptr + b * stride_dkb + h * stride_dkh + offs[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = dv_ptr + b * stride_dvb + h * stride_dvh + offs[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    if EVEN:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty))
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=rows_ok[:, None])
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=rows_ok[:, None])
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=rows_ok[:, None])


# ----------------------------------------------------------------------------------------
# Launch configuration (heuristic; tune on the GPU by editing these two functions)
# ----------------------------------------------------------------------------------------
def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, next_power_of_2(n))


@dataclass(frozen=True)
class ForwardConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 0  # 0: one program per tile; k: at most k·SMs programs, each looping over tiles
    tma: bool = False  # q, k, v, o through tensor descriptors (where their layout allows, else pointers)


@dataclass(frozen=True)
class BackwardConfig:
    single_tile: bool   # one program per (batch, head), N ≤ block_own
    block_own: int      # key rows (dK, dV) and query rows (dQ) owned by one program
    block_loop: int     # rows streamed per iteration of the inner loops
    num_warps: int
    num_stages: int


def forward_config(seq_len: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> ForwardConfig:
    """Block sizes for the forward kernel; small N: one key block covers the whole row.

    Chosen so that ptxas (sm_90) reports no register spills: fp32 uses FMA dots
    (input_precision="ieee"), which need far more registers than tensor-core dots.
    The interpreter has no registers to spill and costs ~10 ms per program instance, so
    there fp32 takes the larger fp16/bf16 tiles.
    """
    tile = _pow2_at_least(seq_len)
    if dtype == torch.float32 and not _INTERPRETING:
        return ForwardConfig(min(32, tile), min(32, tile), 8 if head_dim >= 128 else 4, 2)
    if head_dim >= 128:
        return ForwardConfig(min(64, tile), min(32, tile), 4, 3)
    if seq_len <= 64:
        return ForwardConfig(tile, tile, 4, 3)
    return ForwardConfig(128, 64, 8, 3)


def backward_config(seq_len: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> BackwardConfig:
    """Block sizes for the backward kernels: one tile per (batch, head) for N ≤ 64 with
    tensor-core dots; fp32 (FMA dots) always streams small blocks over 8 warps to avoid spills
    (`python3 -m bench.compile_report`, sm_90: 32×32 blocks over 4 warps need 255 registers and
    spill 160 bytes with Triton 3.6; over 8 warps, 128 registers and no spills).

    Half precision streams 64 owned rows, so that on sm_90 the dots compile to wgmma (HGMMA needs
    64 rows per warpgroup; 32-row tiles fall back to mma.sync). At D = 128 that takes 8 warps:
    64×32 over 4 warps needs 224 registers, over 8 warps 147, no spills (Triton 3.6, offline)."""
    tile = _pow2_at_least(seq_len)
    if dtype == torch.float32 and not _INTERPRETING:
        if head_dim >= 128:
            return BackwardConfig(False, 16, 16, 4, 1)
        return BackwardConfig(False, min(32, tile), min(32, tile), 8, 2)
    if tile <= 64:
        return BackwardConfig(True, tile, tile, 8 if head_dim >= 128 else 4, 1)
    if head_dim >= 128:
        return BackwardConfig(False, 64, 32, 8, 2)
    return BackwardConfig(False, 64, 32, 4, 3)


def forward_candidates(seq_len: int, heuristic: ForwardConfig, grid: str = "quick",
                       dtype: torch.dtype = torch.bfloat16) -> list:
    """Forward configurations to try beside `heuristic` (bench/tune_kernels.py, autotuning): query and
    key blocks of 32 to 128 rows (up to N rounded up to a power of two), 4 or 8 warps, pipeline stages
    3 ("quick") or 2 to 4 ("full"), and persistent grids (programs_per_sm 1, 2, and 4 on 4 warps) of the
    heuristic's tiles ("quick") or of every 3-stage one ("full"), in half precision each of those through
    tensor descriptors too (tma); "minimal" (the interpreter): one besides the
    heuristic. fp32 on a GPU (FMA dots, many registers) only up to 64 rows. The heuristic first."""
    return _candidates(seq_len, heuristic, grid, "fwd", dtype)


def backward_candidates(seq_len: int, heuristic: BackwardConfig, grid: str = "quick",
                        dtype: torch.dtype = torch.bfloat16) -> list:
    """Backward configurations to try beside `heuristic`, as forward_candidates: owned blocks of 32 to
    128 rows streaming blocks of 16 to 64 (never more than owned, and not 128 by 64 on 4 warps, which
    spills), stages 2 ("quick") or 1 to 3 ("full"), and for N <= 64 the single-tile kernel."""
    return _candidates(seq_len, heuristic, grid, "bwd", dtype)


def _candidates(seq_len, heuristic, grid, direction, dtype) -> list:
    if grid not in ("quick", "full", "minimal"):
        raise ValueError(f"attention candidates: grid must be quick, full or minimal, got {grid!r}")
    tile = _pow2_at_least(seq_len)
    blocks = [b for b in (16, 32, 64, 128) if b <= max(tile, 16)]
    large = [b for b in blocks if b >= 32] or blocks
    if dtype == torch.float32 and not _INTERPRETING:
        large = [b for b in large if b <= 64]
    quick = grid != "full"
    if direction == "fwd":
        stages = (3,) if quick else (2, 3, 4)
        configs = [ForwardConfig(m, n, w, s) for m, n, w, s in itertools.product(large, large, (4, 8), stages)]
        # persistent grids of 1, 2 (and for 4 warps 4) programs per SM: the heuristic's tiles ("quick"),
        # every 3-stage one ("full"); half precision: each of those through tensor descriptors too
        bases = [heuristic] if quick else [c for c in configs if c.num_stages == 3]
        variants = [dataclasses.replace(c, programs_per_sm=p) for c in bases
                    for p in (0, 1, 2, 4) if p <= 2 or c.num_warps <= 4]
        configs += variants
        if dtype != torch.float32 and TensorDescriptor is not None:
            configs += [dataclasses.replace(c, tma=True) for c in variants]
    else:
        stages = (2,) if quick else (1, 2, 3)
        # own * loop <= 1024 * warps: 128 owned rows streaming 64-row blocks on 4 warps hold dk, dv and a
        # 128x64 score block in registers, which spills on sm_90 at every stage count (offline compile)
        configs = [BackwardConfig(False, own, loop, w, s) for own, loop, w, s in
                   itertools.product(large, [b for b in blocks if b <= 64], (4, 8), stages)
                   if loop <= own and own * loop <= 1024 * w]
        if tile <= 64:
            configs += [BackwardConfig(True, tile, tile, w, s) for w, s in itertools.product((4, 8), (1, 2))]
    configs = list(dict.fromkeys(c for c in configs if c != heuristic))  # unique, in order
    if grid == "minimal":
        configs = configs[:1]
    return [heuristic] + configs


# ----------------------------------------------------------------------------------------
# Validation and launchers
# ----------------------------------------------------------------------------------------
def _strides(t: torch.Tensor):
    return tuple(t.stride())


_INTERPRETING = is_interpreted(_attention_forward_kernel)


def _check_device(t: torch.Tensor, op: str = "attention") -> None:
    check_interpreter_device(t, _INTERPRETING, op, f"{op}_reference")
    if _INTERPRETING and t.device.type != "cpu":
        raise RuntimeError(f"{op}: runs in the Triton interpreter (TRITON_INTERPRET=1) and needs CPU tensors, "
                           f"got {t.device}")
    if _INTERPRETING and t.dtype == torch.bfloat16:
        raise TypeError(f"{op}: bfloat16 is not supported by the Triton interpreter (its bf16 dots are wrong); "
                        f"use fp32/fp16 on CPU")


def _check_scale(scale, head_dim: int, op: str = "attention") -> float:
    if scale is None:
        return head_dim ** -0.5
    if not is_real(scale):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not 0.0 < scale < math.inf:  # (comparisons only: a symbolic float under torch.compile has no isfinite)
        raise ValueError(f"{op}: scale must be finite and positive, got {scale}")
    if not _SCALE_RANGE[0] <= scale <= _SCALE_RANGE[1]:  # the kernels take 1/scale and scale·log2(e) in fp32
        raise ValueError(f"{op}: scale must lie in [{_SCALE_RANGE[0]:.3g}, {_SCALE_RANGE[1]:.3g}] (the kernels "
                         f"compute 1/scale and scale·log2(e) in fp32), got {scale}")
    return scale


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str = "attention") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape (B, H, N, D), got {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v must have the same shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: dtype {q.dtype} is not supported (float32, float16, bfloat16)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, seq_len, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim D={head_dim} is not supported {SUPPORTED_HEAD_DIMS}")
    if seq_len < 1 or seq_len > _MAX_SEQUENCE:
        raise ValueError(f"{op}: sequence length N={seq_len} must be in [1, {_MAX_SEQUENCE}]")
    if batch < 1 or heads < 1:
        raise ValueError(f"{op}: batch and head counts must be positive, got B={batch}, H={heads}")


def _addressable(t: torch.Tensor) -> torch.Tensor:
    """The kernels index within one (batch, head) with int32 offsets; copy if they overflow."""
    return t if span(t, 2) <= INT32_MAX else t.contiguous()


def _descriptor_ready(t: torch.Tensor, rows: int) -> bool:
    """Whether a (B, H, N, D) tensor can be read or written as [1, 1, rows, D] boxes of a tensor descriptor:
    D contiguous, the other strides positive multiples of 16 bytes, a 16-byte aligned base, rows ≤ N, and
    on CUDA a GPU with a tensor memory accelerator (sm_90 or later)."""
    size = t.element_size()
    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    return (TensorDescriptor is not None and t.stride(-1) == 1 and t.shape[-1] * size >= 16
            and all(stride > 0 and stride * size % 16 == 0 for stride in t.stride()[:-1])
            and t.data_ptr() % 16 == 0 and rows <= t.shape[2])


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _empty_strided_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _tuned(direction, heuristic, candidates, tensors, run):
    """The autotuned configuration (a dict of the config's fields) of this problem (kernels.autotune; None:
    autotuning is off, or it is a graph capture with no earlier pick, and the heuristic runs).
    run(fields) launches with that configuration into fresh outputs and returns them."""
    if not autotune.autotune_enabled():
        return None
    q = tensors[0]
    batch, heads, seq_len, head_dim = q.shape
    # the strides of every operand are part of the problem (q, k, v read in place from a qkv conv output)
    key = (batch, heads, seq_len, head_dim, str(q.dtype).removeprefix("torch."),
           *("x".join(map(str, t.stride())) for t in tensors))

    def fields():
        configs = candidates(seq_len, heuristic, autotune.candidate_grid(_INTERPRETING), q.dtype)
        return dataclasses.asdict(heuristic), [dataclasses.asdict(c) for c in configs]

    return autotune.choose(f"attention_{direction}", key, q.device, fields, run, interpreted=_INTERPRETING)


@on_tensor_device
def _attention_forward_into(q, k, v, scale: float, o, lse, config: ForwardConfig | None = None):
    """Launch the forward kernel writing O into `o` (B, H, N, D, any strides) and the
    natural-log logsumexp into `lse` (contiguous (B, H, N) fp32)."""
    batch, heads, seq_len, head_dim = q.shape
    if config is None:
        config = forward_config(seq_len, head_dim, q.dtype)
        tuned = _tuned("fwd", config, forward_candidates, (q, k, v, o), lambda c: _attention_forward_into(
            q, k, v, scale, _empty_strided_like(o), _empty_strided_like(lse), ForwardConfig(**c)))
        config = ForwardConfig(**tuned) if tuned is not None else config
    q, k, v = _addressable(q), _addressable(k), _addressable(v)
    descriptors = [None] * 4
    boxes = ((q, config.block_m), (k, config.block_n), (v, config.block_n), (o, config.block_m))  # (tensor, rows)
    if config.tma and all(_descriptor_ready(t, rows) for t, rows in boxes):
        descriptors = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, head_dim])
                       for t, rows in boxes]
    num_query_blocks = cdiv(seq_len, config.block_m)
    num_tiles = num_query_blocks * batch * heads
    programs = num_tiles
    if config.programs_per_sm:
        sms = 1 if _INTERPRETING else _sm_count(q.device)
        programs = min(num_tiles, config.programs_per_sm * sms)
    autotune.launch(_attention_forward_kernel, (programs,))(
        q, k, v, o, lse, *descriptors,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        heads, seq_len, num_query_blocks, num_tiles, scale, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        EVEN_M=seq_len % config.block_m == 0, EVEN_N=seq_len % config.block_n == 0,
        DOT_PRECISION=_dot_precision(q.dtype), PRECISE=q.dtype == torch.float32,
        PERSISTENT=programs < num_tiles, USE_TMA=descriptors[0] is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o, lse


@on_tensor_device
def _attention_backward_into(q, k, v, o, lse, do, scale: float, dq, dk, dv,
                             config: BackwardConfig | None = None):
    """Launch the backward kernels writing dq, dk, dv (B, H, N, D, any strides)."""
    batch, heads, seq_len, head_dim = q.shape
    if config is None:
        config = backward_config(seq_len, head_dim, q.dtype)
        tuned = _tuned("bwd", config, backward_candidates, (q, k, v, o, do, dq, dk, dv),
                       lambda c: _attention_backward_into(q, k, v, o, lse, do, scale, _empty_strided_like(dq),
                                                          _empty_strided_like(dk), _empty_strided_like(dv),
                                                          BackwardConfig(**c)))
        config = BackwardConfig(**tuned) if tuned is not None else config
    q, k, v, o, do = (_addressable(t) for t in (q, k, v, o, do))
    lse = lse.contiguous()  # indexed as (B·H, N)
    precision = _dot_precision(q.dtype)
    if config.single_tile:
        if seq_len > config.block_own:
            raise ValueError(f"attention backward: single-tile config with block "
                             f"{config.block_own} < N={seq_len}")
        autotune.launch(_attention_backward_single_tile_kernel, (batch * heads,))(
            q, k, v, o, do, lse, dq, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do),
            *_strides(dq), *_strides(dk), *_strides(dv),
            heads, seq_len, scale, scale * _LOG2E, 1.0 / scale,
            HEAD_DIM=head_dim, BLOCK=config.block_own, EVEN=seq_len == config.block_own,
            DOT_PRECISION=precision, PRECISE=q.dtype == torch.float32,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return dq, dk, dv

    delta = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    delta_block = min(64 if head_dim >= 128 else 128, _pow2_at_least(seq_len))
    num_delta_blocks = cdiv(seq_len, delta_block)
    autotune.launch(_attention_backward_delta_kernel, (num_delta_blocks * batch * heads,))(
        o, do, delta, *_strides(o), *_strides(do),
        heads, seq_len, num_delta_blocks,
        HEAD_DIM=head_dim, BLOCK_M=delta_block, num_warps=4,
    )
    num_blocks = cdiv(seq_len, config.block_own)
    autotune.launch(_attention_backward_kernel, (num_blocks * batch * heads,))(
        q, k, v, do, lse, delta, dq, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dq), *_strides(dk), *_strides(dv),
        heads, seq_len, num_blocks, scale, scale * _LOG2E, 1.0 / scale,
        HEAD_DIM=head_dim, BLOCK_OWN=config.block_own, BLOCK_LOOP=config.block_loop,
        EVEN_OWN=seq_len % config.block_own == 0, EVEN_LOOP=seq_len % config.block_loop == 0,
        DOT_PRECISION=precision, PRECISE=q.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Custom ops on (B, H, N, D) tensors
# ----------------------------------------------------------------------------------------
def _attention_forward_impl(q, k, v, scale):
    # The op is public too (torch.ops.dream_kernels): shapes and scale are checked here and in the fake as
    # well as in the wrapper `attention`. The device check is here only, so that fake tensors
    # (FakeTensorMode, torch.compile tracing) pass.
    _check_qkv(q, k, v)
    _check_scale(scale, q.shape[-1])
    _check_device(q)
    batch, heads, seq_len, _ = q.shape
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    return _attention_forward_into(q, k, v, scale, o, lse)


@torch.library.custom_op("dream_kernels::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward_impl(q, k, v, scale)


@_attention_forward_op.register_fake
def _(q, k, v, scale):
    _check_qkv(q, k, v)
    _check_scale(scale, q.shape[-1])
    batch, heads, seq_len, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((batch, heads, seq_len), dtype=torch.float32))


def _check_backward_inputs(q, k, v, o, lse, do, scale, op: str = "attention_backward") -> None:
    _check_qkv(q, k, v, op)
    _check_scale(scale, q.shape[-1], op)
    for name, t in (("o", o), ("do", do)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} must be a {q.dtype} tensor of q's shape {tuple(q.shape)} on {q.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"{op}: lse must be a float32 tensor of shape {tuple(q.shape[:3])} on {q.device}, got "
                         f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")


def _attention_backward_impl(q, k, v, o, lse, do, scale):
    _check_backward_inputs(q, k, v, o, lse, do, scale)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    return _attention_backward_into(q, k, v, o, lse, do, scale, dq, dk, dv)


@torch.library.custom_op("dream_kernels::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_backward_impl(q, k, v, o, lse, do, scale)


@_attention_backward_op.register_fake
def _(q, k, v, o, lse, do, scale):
    _check_backward_inputs(q, k, v, o, lse, do, scale)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward_autograd(ctx, grad_o, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv = _attention_backward_call(q, k, v, o, lse, grad_o, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd("dream_kernels::attention_forward", _attention_backward_autograd,
                                setup_context=_attention_setup_context)
_attention_forward_call = OpCall("dream_kernels::attention_forward", _attention_forward_impl,
                                 _attention_setup_context, _attention_backward_autograd)
_attention_backward_call = OpCall("dream_kernels::attention_backward", _attention_backward_impl)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ) v over the last two dims of (B, H, N, D) tensors (non-causal).

    fp32/fp16/bf16, D ∈ {16, 32, 64, 128}, 1 ≤ N ≤ 4096, any strides; scale defaults to D^-1/2.
    Differentiable in q, k, v (flash-style backward, deterministic).
    """
    _check_qkv(q, k, v)
    scale = _check_scale(scale, q.shape[-1])
    reject_function_transforms("attention", "attention_reference", q, k, v)
    o, _ = _attention_forward_call(q, k, v, scale)
    return o


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """Eager softmax attention (any float dtype and device): softmax(scale · q kᵀ) v.
    Materialises the (B, H, N, N) scores; softmax runs in fp32 for fp16/bf16 inputs."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    softmax_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(v.dtype)
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------------------
# Attention reading the attention block's qkv 1×1-conv output in place
# ----------------------------------------------------------------------------------------
def _qkv_nchw_views(qkv: torch.Tensor, num_heads: int):
    """(B, 3C, H, W) → q, k, v views (B, heads, H·W, C/heads), no copies:
    q[b, head, n, d] = qkv[b, 0·C + head·(C/heads) + d, n], k with 1·C, v with 2·C."""
    batch, channels3, height, width = qkv.shape
    head_dim = channels3 // (3 * num_heads)
    split = qkv.reshape(batch, 3, num_heads, head_dim, height * width).transpose(-1, -2)
    return split[:, 0], split[:, 1], split[:, 2]


def _nchw_as_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, C, H, W) → view (B, heads, H·W, C/heads) with x[b, head·(C/heads)+d, n]."""
    batch, channels, height, width = x.shape
    return x.reshape(batch, num_heads, channels // num_heads, height * width).transpose(-1, -2)


def _check_qkv_nchw(qkv: torch.Tensor, num_heads: int, scale=None, op: str = "attention_qkv_nchw") -> None:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"{op}: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 4:
        raise ValueError(f"{op}: qkv must have shape (B, 3C, H, W), got {tuple(qkv.shape)}")
    if not is_int(num_heads) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[1] % (3 * num_heads) != 0:
        raise ValueError(f"{op}: channels {qkv.shape[1]} are not divisible by 3·num_heads={3 * num_heads}")
    q, k, v = _qkv_nchw_views(qkv, int(num_heads))
    _check_qkv(q, k, v, op)
    _check_scale(scale, q.shape[-1], op)


def _attention_qkv_nchw_forward_impl(qkv, num_heads, scale):
    _check_qkv_nchw(qkv, num_heads, scale)  # here and in the fake too: the op is public
    _check_device(qkv, "attention_qkv_nchw")
    batch, channels3, height, width = qkv.shape
    out = torch.empty((batch, channels3 // 3, height, width), device=qkv.device, dtype=qkv.dtype,
                      memory_format=memory_format_of(qkv))
    lse = torch.empty((batch, num_heads, height * width), device=qkv.device, dtype=torch.float32)
    q, k, v = _qkv_nchw_views(qkv, num_heads)
    _attention_forward_into(q, k, v, scale, _nchw_as_heads(out, num_heads), lse)
    return out, lse


@torch.library.custom_op("dream_kernels::attention_qkv_nchw_forward", mutates_args=())
def _attention_qkv_nchw_forward_op(qkv: torch.Tensor, num_heads: int,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_qkv_nchw_forward_impl(qkv, num_heads, scale)


@_attention_qkv_nchw_forward_op.register_fake
def _(qkv, num_heads, scale):
    _check_qkv_nchw(qkv, num_heads, scale)
    batch, channels3, height, width = qkv.shape
    return (torch.empty((batch, channels3 // 3, height, width), device=qkv.device, dtype=qkv.dtype,
                        memory_format=memory_format_of(qkv)),
            qkv.new_empty((batch, num_heads, height * width), dtype=torch.float32))


def _check_qkv_nchw_backward(qkv, out, lse, dout, num_heads, scale) -> None:
    op = "attention_qkv_nchw_backward"
    _check_qkv_nchw(qkv, num_heads, scale, op)
    batch, channels3, height, width = qkv.shape
    for name, t in (("out", out), ("dout", dout)):
        if tuple(t.shape) != (batch, channels3 // 3, height, width) or t.dtype != qkv.dtype or t.device != qkv.device:
            raise ValueError(f"{op}: {name} must be a {qkv.dtype} tensor of shape "
                             f"{(batch, channels3 // 3, height, width)} on {qkv.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if tuple(lse.shape) != (batch, num_heads, height * width) or lse.dtype != torch.float32 or lse.device != qkv.device:
        raise ValueError(f"{op}: lse must be a float32 tensor of shape {(batch, num_heads, height * width)} on "
                         f"{qkv.device}, got {lse.dtype} {tuple(lse.shape)} on {lse.device}")


def _attention_qkv_nchw_backward_impl(qkv, out, lse, dout, num_heads, scale):
    _check_qkv_nchw_backward(qkv, out, lse, dout, num_heads, scale)
    dqkv = torch.empty_like(qkv, memory_format=memory_format_of(qkv))
    q, k, v = _qkv_nchw_views(qkv, num_heads)
    dq, dk, dv = _qkv_nchw_views(dqkv, num_heads)
    _attention_backward_into(q, k, v, _nchw_as_heads(out, num_heads), lse,
                             _nchw_as_heads(dout, num_heads), scale, dq, dk, dv)
    return dqkv


@torch.library.custom_op("dream_kernels::attention_qkv_nchw_backward", mutates_args=())
def _attention_qkv_nchw_backward_op(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                    dout: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    return _attention_qkv_nchw_backward_impl(qkv, out, lse, dout, num_heads, scale)


@_attention_qkv_nchw_backward_op.register_fake
def _(qkv, out, lse, dout, num_heads, scale):
    _check_qkv_nchw_backward(qkv, out, lse, dout, num_heads, scale)
    return torch.empty_like(qkv, memory_format=memory_format_of(qkv))


def _attention_qkv_nchw_setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads = num_heads
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_qkv_nchw_backward_autograd(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dqkv = _attention_qkv_nchw_backward_call(qkv, out, lse, grad_out, ctx.num_heads, ctx.scale)
    return dqkv, None, None


torch.library.register_autograd("dream_kernels::attention_qkv_nchw_forward",
                                _attention_qkv_nchw_backward_autograd,
                                setup_context=_attention_qkv_nchw_setup_context)
_attention_qkv_nchw_forward_call = OpCall("dream_kernels::attention_qkv_nchw_forward", _attention_qkv_nchw_forward_impl,
                                          _attention_qkv_nchw_setup_context, _attention_qkv_nchw_backward_autograd)
_attention_qkv_nchw_backward_call = OpCall("dream_kernels::attention_qkv_nchw_backward",
                                           _attention_qkv_nchw_backward_impl)


def attention_qkv_nchw(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """Multi-head attention over the H·W tokens of a (B, 3C, H, W) qkv conv output.

    Channels split as (3, heads, C/heads); token n = h·W + w. Returns (B, C, H, W) with
    out[b, head·(C/heads) + d, n] = attention(q, k, v)[b, head, n, d], reading qkv and
    writing the output in place (no permute/contiguous copies). scale defaults to
    (C/heads)^-1/2.
    """
    _check_qkv_nchw(qkv, num_heads)
    num_heads = int(num_heads)
    scale = _check_scale(scale, qkv.shape[1] // (3 * num_heads), "attention_qkv_nchw")
    reject_function_transforms("attention_qkv_nchw", "attention_qkv_nchw_reference", qkv)
    out, _ = _attention_qkv_nchw_forward_call(qkv, num_heads, scale)
    return out


def attention_qkv_nchw_reference(qkv: torch.Tensor, num_heads: int,
                                 scale: float | None = None) -> torch.Tensor:
    """Eager version of attention_qkv_nchw (any float dtype and device)."""
    batch, channels3, height, width = qkv.shape
    q, k, v = _qkv_nchw_views(qkv, num_heads)
    o = attention_reference(q, k, v, scale)  # (B, heads, N, C/heads)
    return o.transpose(-1, -2).reshape(batch, channels3 // 3, height, width)


# The Python implementation behind each custom op (what a launch of the op runs), for tools
# that replay recorded op calls without the dispatcher (bench/compile_report.py).
OP_IMPLEMENTATIONS = {
    "dream_kernels::attention_forward": _attention_forward_impl,
    "dream_kernels::attention_backward": _attention_backward_impl,
    "dream_kernels::attention_qkv_nchw_forward": _attention_qkv_nchw_forward_impl,
    "dream_kernels::attention_qkv_nchw_backward": _attention_qkv_nchw_backward_impl,
}
