#!/usr/bin/env python3
"""The PyTorch MoE layers that hexamoe is measured against, timed on one GPU (or the CPU).

Each peer computes the same layer as `hexamoe bench` (core/MoeLayer.hpp):

    logits = x Wr + br, p = softmax(logits) (float32), top-k -> (idx, g)
    y[t]   = sum_j g[t,j] (W2[e] gelu(W1[e] x[t] + b1[e]) + b2[e]),  e = idx[t,j]
    L_aux  = 0.01 * E * sum_e f_e P_e          (Switch/GShard balance loss)

forward and forward+backward (dy random, plus the auxiliary loss), with the
expert part done three ways:

  padded   GShard/Tutel: capacity buffer [E, C, d] (C = ceil(cf*k*T/E), overflow
           dropped, padding rows computed), batched GEMMs (baddbmm), combine
  loop     FastMoE: sort assignments by expert, one GEMM pair per expert
  grouped  MegaBlocks/torchtitan: sort, torch._grouped_mm (bf16 only)

--no-router times the expert part alone (routing computed once, outside).
--device cpu runs them on the host (--threads N: torch.set_num_threads; set
OPENBLAS_NUM_THREADS alike): wall-clock medians, no peak memory (PyTorch does
not count host allocations), the roofline from 2048^3 matmuls.

Method: inputs are random (never zeros); times are the median of --reps runs
after --warmup runs, measured with CUDA events; peak extra memory is
torch.cuda.max_memory_allocated() during the timed forward+backward runs minus
what was allocated before them (parameters, inputs, and gradients, which exist
after the warm-up); every peer's output is compared with a float64 evaluation
of the same routing (max |y - y64| / max |y64|).

Output: JSON lines (one per shape, peer and dtype), and with --roofline first
the measured ceilings (dense matrix rate in bf16, float32 and tf32 through
torch.matmul on random 8192^3 operands; device-to-device copy bandwidth,
bytes read plus written).

--report OURS.jsonl PEERS.jsonl prints the Markdown table of docs/PERFORMANCE.md
from a `hexamoe bench --json` run and a run of this script (with --roofline).
"""
import argparse
import json
import math
import platform
import sys
import time

# The shapes of `hexamoe bench` (bench/LayerBench.cpp, swin_shapes()).
SHAPES = [
    dict(name="swinS-s3-top1", T=14400, d=384, H=1536, E=8, k=1),
    dict(name="swinS-s3-top2", T=14400, d=384, H=1536, E=8, k=2),
    dict(name="swinS-s4-top1", T=3600, d=768, H=3072, E=8, k=1),
    dict(name="swinB-s3-top1", T=14400, d=512, H=2048, E=8, k=1),
    dict(name="swinB-s4-top1", T=3600, d=1024, H=4096, E=8, k=1),
    dict(name="e64-top2-skew", T=16384, d=1024, H=4096, E=64, k=2, skew=2.0),
]
AUX_WEIGHT = 0.01
DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16"}


def flops_fwd(s):
    """Useful forward FLOPs: two GEMMs per assignment (the router's 2*T*d*E is <0.5%)."""
    return 4.0 * s["T"] * s["k"] * s["d"] * s["H"]


def bytes_fwd(s, esize):
    """Fewest bytes a forward must move: read x and every expert weight, write y."""
    E, d, H, T = s["E"], s["d"], s["H"], s["T"]
    return esize * (2 * T * d + E * (2 * d * H + H + d))


def bytes_fwdbwd(s, esize):
    """Forward+backward floor: the forward's bytes, plus read dy, write dx and
    the weight gradients (float32), read the weights again."""
    E, d, H, T = s["E"], s["d"], s["H"], s["T"]
    return bytes_fwd(s, esize) + esize * (2 * T * d + E * (2 * d * H)) + 4 * E * (2 * d * H + H + d)


# ----------------------------------------------------------------------------
# The peers (imported lazily so that --report runs without torch).

def make_layer(torch, s, dtype, dev):
    E, d, H = s["E"], s["d"], s["H"]
    g = torch.Generator(device=dev).manual_seed(1)
    P = lambda *shape, std: torch.nn.Parameter(torch.randn(*shape, device=dev, generator=g) * std)
    m = torch.nn.Module()
    m.wr = P(d, E, std=0.02)  # router in float32, as ours
    m.br = torch.nn.Parameter(torch.zeros(E, device=dev))
    with torch.no_grad():
        m.br[0] += s.get("skew", 0.0)
    m.w1 = torch.nn.Parameter((torch.randn(E, d, H, device=dev, generator=g) * 0.02).to(dtype))
    m.b1 = torch.nn.Parameter(torch.zeros(E, H, device=dev, dtype=dtype))
    m.w2 = torch.nn.Parameter((torch.randn(E, H, d, device=dev, generator=g) * 0.02).to(dtype))
    m.b2 = torch.nn.Parameter(torch.zeros(E, d, device=dev, dtype=dtype))
    return m


def route(torch, m, x, k):
    p = (x.float() @ m.wr + m.br).softmax(-1)
    gate, idx = p.topk(k, dim=-1)
    E = p.shape[1]
    f = torch.bincount(idx.reshape(-1), minlength=E).float() / idx.numel()  # no gradient
    aux = AUX_WEIGHT * E * (f * p.mean(0)).sum()
    return gate, idx, aux


def experts_padded(torch, F, m, x, gate, idx, cf=1.25):
    T, d = x.shape
    E, k = m.w1.shape[0], idx.shape[1]
    C = int(math.ceil(cf * k * T / E))
    flat = idx.t().reshape(-1)  # slot-major, as GShard
    pos = (F.one_hot(flat, E).cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    keep = pos < C
    tok = torch.arange(T, device=x.device).repeat(k)
    e_k, p_k, t_k = flat[keep], pos[keep], tok[keep]
    buf = x.new_zeros(E, C, d).index_put((e_k, p_k), x[t_k])
    h = F.gelu(torch.baddbmm(m.b1[:, None, :], buf, m.w1))
    o = torch.baddbmm(m.b2[:, None, :], h, m.w2)
    g = gate.t().reshape(-1)[keep].to(x.dtype)
    return x.new_zeros(T, d).index_add(0, t_k, o[e_k, p_k] * g[:, None])


def sort_assignments(torch, idx):
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    return order, order // k


def experts_loop(torch, F, m, x, gate, idx):
    E = m.w1.shape[0]
    order, tok = sort_assignments(torch, idx)
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()  # a host sync, as FastMoE
    xs = x[tok]
    outs, start = [], 0
    for e, c in enumerate(counts):
        xe = xs[start:start + c]
        outs.append(F.gelu(xe @ m.w1[e] + m.b1[e]) @ m.w2[e] + m.b2[e])
        start += c
    o = torch.cat(outs)
    g = gate.reshape(-1)[order].to(x.dtype)
    return x.new_zeros(x.shape).index_add(0, tok, o * g[:, None])


def experts_grouped(torch, F, m, x, gate, idx):
    E = m.w1.shape[0]
    order, tok = sort_assignments(torch, idx)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[tok]
    e_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=idx.numel())
    h = F.gelu(torch._grouped_mm(xs, m.w1, offs=offs) + m.b1[e_of_row])
    o = torch._grouped_mm(h, m.w2, offs=offs) + m.b2[e_of_row]
    g = gate.reshape(-1)[order].to(x.dtype)
    return x.new_zeros(x.shape).index_add(0, tok, o * g[:, None])


PEERS = {"padded": experts_padded, "loop": experts_loop, "grouped": experts_grouped}


def reference64(torch, F, m, x, gate, idx, keep_mask=None):
    """y in float64 for a given routing (keep_mask: the padded peer's drops)."""
    x64 = x.double()
    y = torch.zeros_like(x64)
    T, k = idx.shape
    for j in range(k):
        for e in range(m.w1.shape[0]):
            sel = idx[:, j] == e
            if keep_mask is not None:
                sel = sel & keep_mask[:, j]
            t = sel.nonzero().squeeze(1)
            if t.numel() == 0:
                continue
            h = F.gelu(x64[t] @ m.w1[e].double() + m.b1[e].double())
            y[t] += gate[t, j].double()[:, None] * (h @ m.w2[e].double() + m.b2[e].double())
    return y


def padded_keep(torch, F, idx, E, cf=1.25):
    T, k = idx.shape
    C = int(math.ceil(cf * k * T / E))
    flat = idx.t().reshape(-1)
    pos = (F.one_hot(flat, E).cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    return (pos < C).reshape(k, T).t()


def time_ms(torch, fn, reps, warmup, dev="cuda"):
    for _ in range(warmup):
        fn()
    ts = []
    if dev == "cpu":
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    else:
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def run_peer(torch, F, s, peer, dtype, args):
    dev = args.device
    m = make_layer(torch, s, dtype, dev)
    g = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(s["T"], s["d"], device=dev, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(s["T"], s["d"], device=dev, generator=g).to(dtype)
    experts = PEERS[peer]
    with torch.no_grad():
        gate0, idx0, _ = route(torch, m, x, s["k"])

    if args.no_router:
        def layer():
            return experts(torch, F, m, x, gate0, idx0), None
    else:
        def layer():
            gate, idx, aux = route(torch, m, x, s["k"])
            return experts(torch, F, m, x, gate, idx), aux

    def fwd():
        with torch.no_grad():
            layer()

    def fwd_bwd():
        y, aux = layer()
        if aux is None:
            y.backward(dy)
        else:
            torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])

    t_fwd = time_ms(torch, fwd, args.reps, args.warmup, dev)
    for _ in range(args.warmup):
        fwd_bwd()  # gradients exist from here on
    peak = None  # PyTorch counts no peak of host allocations
    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t_fb = time_ms(torch, fwd_bwd, args.reps, 0, dev)
    if dev == "cuda":
        peak = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)

    # Accuracy: the peer against float64 on the same routing.
    with torch.no_grad():
        y = experts(torch, F, m, x, gate0, idx0)
        keep = padded_keep(torch, F, idx0, s["E"]) if peer == "padded" else None
        ref = reference64(torch, F, m, x, gate0, idx0, keep)
        rel = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        dropped = 0.0 if keep is None else 1.0 - keep.float().mean().item()
    fl = flops_fwd(s)
    return {"cfg": s["name"], "impl": peer, "dtype": DTYPE_NAMES[str(dtype).split(".")[-1]],
            "tokens": s["T"], "router": not args.no_router,
            "fwd_ms": round(t_fwd, 4), "fwdbwd_ms": round(t_fb, 4),
            "fwd_GFLOPs": round(fl / t_fwd / 1e6, 1), "fwdbwd_GFLOPs": round(3 * fl / t_fb / 1e6, 1),
            "peak_extra_MiB": peak, "max_rel_diff_fp64": float("%.3g" % rel),
            "dropped_fraction": round(dropped, 4)}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def roofline(torch, dev="cuda"):
    cpu = dev == "cpu"
    name = cpu_model() if cpu else torch.cuda.get_device_name()
    out = {"kind": "roofline", "device": name, "torch": torch.__version__}
    if cpu:
        out["threads"] = torch.get_num_threads()
    n = 2048 if cpu else 8192
    g = torch.Generator(device=dev).manual_seed(3)
    for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False),
                           ("tf32", torch.float32, True)):
        if cpu and tf32:
            continue  # no tf32 on a CPU
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=dev, generator=g).to(dt)
        b = torch.randn(n, n, device=dev, generator=g).to(dt)
        ms = time_ms(torch, lambda: a @ b, 10 if name == "bf16" else 5, 3, dev)
        out["matmul_%s_TFLOPs" % name] = round(2.0 * n ** 3 / ms / 1e9, 4 if cpu else 1)
    torch.backends.cuda.matmul.allow_tf32 = False
    src = torch.randn((64 if cpu else 512) * 2**20, device=dev, generator=g)  # 256 MiB / 2 GiB
    dst = torch.empty_like(src)
    ms = time_ms(torch, lambda: dst.copy_(src), 20, 3, dev)
    out["copy_GBs"] = round(2 * src.numel() * 4 / ms / 1e6, 1)
    del src, dst
    return out


# ----------------------------------------------------------------------------
# The report: ours beside the peers, ratios and the roofline floor.

def report(ours_path, peers_path, cmd_ours, cmd_peers):
    ours, peers, roof = {}, {}, None
    for path in ours_path.split(","):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                if r.get("impl") == "hexamoe":
                    # One row per (shape, dtype, arithmetic): float32 may run as
                    # 3xtf32 or fma (same precision) or tf32 (compared with the
                    # tf32 matrix rate, not with the float32 peers).
                    math = r.get("math", "")
                    dt = "tf32" if math == "tf32" else r["dtype"]
                    ours[(r["cfg"], dt, math)] = r
    for line in open(peers_path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r.get("kind") == "roofline":
            roof = r
        elif "fwd_ms" in r:
            peers.setdefault((r["cfg"], r["dtype"]), {})[r["impl"]] = r
    by_name = {s["name"]: s for s in SHAPES}
    print("| shape | dtype | hexamoe fwd / f+b ms | padded fwd / f+b ms | loop fwd / f+b ms | grouped fwd / f+b ms"
          " | f+b speedup vs fastest peer | peak extra MiB ours / padded (ratio) | fwd floor ms (% of floor)"
          " | max rel diff to float64: ours / peers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (cfg, dt, math), r in ours.items():
        s = by_name.get(cfg)
        if s is None:
            continue
        s = dict(s, T=r["tokens"])  # the token count that ran (--token-scale)
        p = peers.get((cfg, dt), {})
        esize = 2 if dt == "bfloat16" else 4
        cells = []
        for name in ("padded", "loop", "grouped"):
            q = p.get(name)
            cells.append("%.3f / %.3f" % (q["fwd_ms"], q["fwdbwd_ms"]) if q else "-")
        fastest = min((q["fwdbwd_ms"] for q in p.values()), default=None)
        speed = "%.2fx" % (fastest / r["fwdbwd_ms"]) if fastest else "-"
        # Our peak counts everything the benchmark allocated; subtract what the
        # peers' baseline holds (parameters, their gradients, x, y, dy, dx).
        E, d, H, T = s["E"], s["d"], s["H"], s["T"]
        params = esize * E * (2 * d * H + H + d) + 4 * (d * E + E)
        grads = 4 * E * (2 * d * H + H + d) + 4 * (d * E + E)
        io = 4 * esize * T * d
        ours_extra = r["peak_MiB"] - (params + grads + io) / 2**20
        pad = p.get("padded")
        mem = "%.0f / %.0f (%.2fx)" % (ours_extra, pad["peak_extra_MiB"], ours_extra / pad["peak_extra_MiB"]) \
            if pad and (pad.get("peak_extra_MiB") or 0) > 0 else "%.0f / -" % ours_extra
        floor = "-"
        if roof:
            rate = roof.get("matmul_%s_TFLOPs" % {"bfloat16": "bf16", "tf32": "tf32"}.get(dt, "fp32"), 0) * 1e12
            t = max(flops_fwd(s) / rate, bytes_fwd(s, esize) / (roof["copy_GBs"] * 1e9)) * 1e3
            floor = "%.3f (%.0f%%)" % (t, 100 * t / r["fwd_ms"])
        errs = [q["max_rel_diff_fp64"] for q in p.values() if "max_rel_diff_fp64" in q]
        acc = "%s / %s" % ("%.1e" % r["max_rel_diff_fp64"] if "max_rel_diff_fp64" in r else "-",
                           ("%.1e-%.1e" % (min(errs), max(errs))) if errs else "-")
        label = "%s (%s)" % (dt, math) if dt == "float32" and math else dt
        print("| %s | %s | %.3f / %.3f | %s | %s | %s | %s | %s | %s | %s |" % (
            cfg, label, r["fwd_ms"], r["fwdbwd_ms"], cells[0], cells[1], cells[2], speed, mem, floor, acc))
    if roof and "threads" in roof:
        print("\nCeilings measured in the same run: %s, %d PyTorch thread(s); bf16 %.1f, fp32 %.1f GFLOP/s"
              " (torch.matmul, 2048^3 random); copy %.1f GB/s (read + write)." % (
                  roof["device"], roof["threads"], 1e3 * roof["matmul_bf16_TFLOPs"],
                  1e3 * roof["matmul_fp32_TFLOPs"], roof["copy_GBs"]))
    elif roof:
        print("\nCeilings measured in the same call: %s; bf16 %.0f, fp32 %.1f, tf32 %.0f TFLOP/s (torch.matmul,"
              " 8192^3 random); copy %.0f GB/s (read + write)." % (
                  roof["device"], roof["matmul_bf16_TFLOPs"], roof["matmul_fp32_TFLOPs"],
                  roof["matmul_tf32_TFLOPs"], roof["copy_GBs"]))
    if cmd_ours or cmd_peers:
        print("\nCommands: `%s` and `%s`." % (cmd_ours, cmd_peers))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated shape names")
    ap.add_argument("--dtype", default="float32,bfloat16", help="float32, bfloat16 or both")
    ap.add_argument("--peers", default="padded,loop,grouped")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--token-scale", type=float, default=1.0)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the peers on the host (wall-clock medians; no peak memory)")
    ap.add_argument("--threads", type=int, default=0, help="with --device cpu: torch.set_num_threads (0: as is)")
    ap.add_argument("--no-router", action="store_true", help="time the expert part only")
    ap.add_argument("--roofline", action="store_true", help="measure the matrix rate and copy bandwidth first")
    ap.add_argument("--report", nargs=2, metavar=("OURS", "PEERS"),
                    help="print the Markdown table from hexamoe bench --json output(s) (comma-separated;"
                         " a dtype relabelled tf32 is compared with the tf32 matrix rate) and this script's output")
    ap.add_argument("--cmd-ours", default="")
    ap.add_argument("--cmd-peers", default="")
    args = ap.parse_args()
    if args.report:
        report(args.report[0], args.report[1], args.cmd_ours, args.cmd_peers)
        return 0

    import torch
    import torch.nn.functional as F
    if args.device == "cuda" and not torch.cuda.is_available():
        print("torch_moe.py: no CUDA device (--device cpu runs the peers on the host)", file=sys.stderr)
        return 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.roofline:
        print(json.dumps(roofline(torch, args.device)), flush=True)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    for s in SHAPES:
        if args.only and s["name"] not in args.only.split(","):
            continue
        s = dict(s, T=max(1, int(round(s["T"] * args.token_scale))))
        for dn in args.dtype.split(","):
            for peer in args.peers.split(","):
                if peer == "grouped" and dn != "bfloat16":
                    continue  # torch._grouped_mm takes bf16 operands
                try:
                    print(json.dumps(run_peer(torch, F, s, peer, dtypes[dn], args)), flush=True)
                except Exception as ex:  # a peer that cannot run a shape says so
                    print(json.dumps({"cfg": s["name"], "impl": peer, "dtype": dn, "error": repr(ex)[:300]}),
                          flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
