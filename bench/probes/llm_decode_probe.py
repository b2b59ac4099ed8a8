"""Read-only probe (the edpilot team's, from the steering repo's shared/probes/; it took
edpilot/data/h100_llama8b_decode*.json and h200_llama8b_decode_ctx4k.json): natural power draw of a Llama-3-8B-shaped decoder on one GPU.

Random bf16 weights (the arithmetic, memory traffic and kernels are those of the real model),
a preallocated KV cache with a realistic context, grouped-query SDPA attention, RMSNorm, SwiGLU,
the 128k-vocabulary head and greedy sampling. Each decode step is captured in a CUDA graph
(as serving engines do to remove host gaps); an eager variant shows what host overhead does.
Also one prefill pass per batch. Nothing on the GPU is changed: NVML is used read-only.

Prints one JSON line per configuration and writes all of them to llm_decode_probe.json in the
folder named by PROBE_OUT (default: the current folder). Environment: SECS (window), CTX (positions),
BATCHES (comma list), WEIGHTS (bf16 or fp8).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pynvml
import torch
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = True
DEV = torch.device("cuda")
DT = torch.bfloat16

LAYERS, HID, HEADS, KVH, HD, FFN, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256


FP8 = os.environ.get("WEIGHTS", "bf16") == "fp8"
ONE = None


def lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T; with WEIGHTS=fp8, w is e4m3 and x is cast to e4m3 (per-tensor scale 1), rows padded to 16."""
    if not FP8:
        return x @ w.t()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    pad = (-m) % 16
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    y = torch._scaled_mm(x2.to(torch.float8_e4m3fn), w.t(), scale_a=ONE, scale_b=ONE, out_dtype=DT)
    return y[:m].reshape(*shape[:-1], w.shape[0])


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * w


class Model:
    def __init__(self) -> None:
        g = torch.Generator(device=DEV).manual_seed(0)

        def w(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=DEV, dtype=DT).normal_(0, 0.02, generator=g)

        def wl(*shape: int) -> torch.Tensor:  # a linear layer's weight, fp8 when asked
            t = w(*shape)
            return t.to(torch.float8_e4m3fn) if FP8 else t

        self.emb = w(VOCAB, HID)
        self.head = w(VOCAB, HID)
        self.norm = torch.ones(HID, device=DEV, dtype=DT)
        self.layers = []
        for _ in range(LAYERS):
            self.layers.append(
                dict(
                    qkv=wl((HEADS + 2 * KVH) * HD, HID),
                    o=wl(HID, HEADS * HD),
                    gu=wl(2 * FFN, HID),
                    down=wl(HID, FFN),
                    n1=torch.ones(HID, device=DEV, dtype=DT),
                    n2=torch.ones(HID, device=DEV, dtype=DT),
                )
            )

    def alloc_cache(self, batch: int, ctx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                torch.randn(batch, KVH, ctx, HD, device=DEV, dtype=DT),
                torch.randn(batch, KVH, ctx, HD, device=DEV, dtype=DT),
            )
            for _ in range(LAYERS)
        ]

    def decode(self, tok: torch.Tensor, cache, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per sequence. tok: (B,), mask: (B,1,1,ctx) bool, pos: (1,) int64 slot."""
        b = tok.shape[0]
        x = self.emb[tok]  # (B, HID)
        for layer, (kc, vc) in zip(self.layers, cache):
            h = rms(x, layer["n1"])
            qkv = lin(h, layer["qkv"])
            q, k, v = qkv.split([HEADS * HD, KVH * HD, KVH * HD], dim=-1)
            q = q.view(b, HEADS, 1, HD)
            kc.index_copy_(2, pos, k.view(b, KVH, 1, HD))
            vc.index_copy_(2, pos, v.view(b, KVH, 1, HD))
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
            x = x + lin(a.reshape(b, HEADS * HD), layer["o"])
            h = rms(x, layer["n2"])
            gu = lin(h, layer["gu"])
            gate, up = gu.chunk(2, dim=-1)
            x = x + lin(F.silu(gate) * up, layer["down"])
        logits = rms(x, self.norm) @ self.head.t()
        return logits.argmax(-1)

    def prefill(self, toks: torch.Tensor) -> torch.Tensor:
        """Causal prefill of (B, T) tokens (no cache writes; same arithmetic)."""
        b, t = toks.shape
        x = self.emb[toks]
        for layer in self.layers:
            h = rms(x, layer["n1"])
            qkv = lin(h, layer["qkv"])
            q, k, v = qkv.split([HEADS * HD, KVH * HD, KVH * HD], dim=-1)
            q = q.view(b, t, HEADS, HD).transpose(1, 2)
            k = k.view(b, t, KVH, HD).transpose(1, 2)
            v = v.view(b, t, KVH, HD).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + lin(a.transpose(1, 2).reshape(b, t, HEADS * HD), layer["o"])
            h = rms(x, layer["n2"])
            gate, up = lin(h, layer["gu"]).chunk(2, dim=-1)
            x = x + lin(F.silu(gate) * up, layer["down"])
        return (rms(x[:, -1], self.norm) @ self.head.t()).argmax(-1)


class Sampler(threading.Thread):
    """100 ms power / clock samples, read-only."""

    def __init__(self, h) -> None:
        super().__init__(daemon=True)
        self.h, self.stop_ev, self.samples = h, threading.Event(), []

    def run(self) -> None:
        while not self.stop_ev.is_set():
            p = pynvml.nvmlDeviceGetPowerUsage(self.h) / 1000.0
            c = pynvml.nvmlDeviceGetClockInfo(self.h, pynvml.NVML_CLOCK_SM)
            m = pynvml.nvmlDeviceGetClockInfo(self.h, pynvml.NVML_CLOCK_MEM)
            r = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(self.h)
            self.samples.append((p, c, m, r))
            time.sleep(0.1)


def measure(h, fn, units_per_call: int, seconds: float) -> dict:
    fn()
    torch.cuda.synchronize()
    # warm for ~1.5 s so clocks and power settle
    t_end = time.perf_counter() + 1.5
    while time.perf_counter() < t_end:
        fn()
    torch.cuda.synchronize()
    s = Sampler(h)
    e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    t0 = time.perf_counter()
    s.start()
    calls = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            fn()
        calls += 8
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    s.stop_ev.set()
    s.join()
    secs = t1 - t0
    joules = (e1 - e0) / 1000.0
    units = calls * units_per_call
    p = [x[0] for x in s.samples]
    c = [x[1] for x in s.samples]
    reasons = 0
    for x in s.samples:
        reasons |= x[3]
    return dict(
        seconds=round(secs, 3),
        units=units,
        units_per_s=units / secs,
        watts_counter=joules / secs,
        watts_sampled_mean=sum(p) / len(p),
        watts_sampled_max=max(p),
        sm_clock_median=sorted(c)[len(c) // 2],
        mem_clock=s.samples[len(s.samples) // 2][2],
        j_per_unit=joules / units,
        step_ms=1000 * secs / calls,
        throttle_reasons_or=hex(reasons),
    )


def main() -> None:
    out_dir = os.environ.get("PROBE_OUT", ".")
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    info = dict(
        gpu=pynvml.nvmlDeviceGetName(h),
        limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
        idle_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
        driver=pynvml.nvmlSystemGetDriverVersion(),
        torch=torch.__version__,
    )
    print(json.dumps(dict(info=info)), flush=True)
    global ONE
    ONE = torch.ones((), device=DEV, dtype=torch.float32)
    info["weights"] = "fp8" if FP8 else "bf16"
    model = Model()
    rows = []
    secs = float(os.environ.get("SECS", "5"))
    ctx_total = int(os.environ.get("CTX", "1088"))  # 1024 prompt + 64 generated positions
    for batch in [int(b) for b in os.environ.get("BATCHES", "1,8,32,64,128,256").split(",")]:
        cache = model.alloc_cache(batch, ctx_total)
        mask = torch.ones(batch, 1, 1, ctx_total, device=DEV, dtype=torch.bool)
        pos = torch.tensor([ctx_total - 1], device=DEV)
        tok = torch.randint(0, VOCAB, (batch,), device=DEV)
        # eager (host overhead visible) at small batches only
        if batch in (1, 8, 64):
            r = measure(h, lambda: model.decode(tok, cache, mask, pos), batch, secs)
            r.update(phase="decode", mode="eager", batch=batch, ctx=ctx_total)
            rows.append(r)
            print(json.dumps(r), flush=True)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                out = model.decode(tok, cache, mask, pos)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            out = model.decode(tok, cache, mask, pos)
        r = measure(h, g.replay, batch, secs)
        r.update(phase="decode", mode="cudagraph", batch=batch, ctx=ctx_total)
        rows.append(r)
        print(json.dumps(r), flush=True)
        del g, cache, mask, out
        torch.cuda.empty_cache()
    for batch, t in [(1, 1024), (8, 1024)]:
        toks = torch.randint(0, VOCAB, (batch, t), device=DEV)
        with torch.no_grad():
            r = measure(h, lambda: model.prefill(toks), batch * t, secs)
        r.update(phase="prefill", mode="eager", batch=batch, ctx=t)
        rows.append(r)
        print(json.dumps(r), flush=True)
    info["limit_w_after"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000
    with open(os.path.join(out_dir, "llm_decode_probe.json"), "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    print(json.dumps(dict(done=True, limit_w_after=info["limit_w_after"])), flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
