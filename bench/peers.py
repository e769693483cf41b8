"""leakaudit's MIA scoring against the ways peers score, on the same model and texts, in one run.

Measured for each thread count given (default 1 and 2), all in this one process:
- naive loop (loss only): one text per forward, fp32, full logits, a Python loop gathering log p per token
  (bench/score.py's baseline; the style of LLM-PBE / analysing_pii_leakage scripts);
- mimir-style (5 attacks: loss, zlib, min_k, min_k_pp, ref): per text one target forward with the full
  vocabulary distribution kept (for Min-K%++), the attacks computed from it, and one reference forward per
  text -- the structure of mimir's run loop; timed in fp32 and in the engine's dtype;
- the engine: `leakaudit.scoring.score_texts` (loss only) and `ScoringContext` with the same 5 attacks
  (length-bucketed batches, one shared pass, moments in place), score cache off;
- whole process: `leakaudit score` and `leakaudit mia` as a user runs them (model load, tokenisation and
  writing included), with LEAKAUDIT_THREADS set, cache off.
The reference model is the target itself loaded once more: the comparison is about cost, not AUC.
It also measures the fp32 and bf16 matmul peaks (bf16 also as one matmul per thread at once, the way the engine's
batch workers run), so the engine's achieved GFLOP/s reads as a share of them.

    .venv/bin/python bench/peers.py [--model default] [--texts 60] [--threads 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from score import bench_texts, forward_flops, matmul_peak, matmul_peak_per_thread, naive_loop  # noqa: E402

from leakaudit.attacks import ScoringContext, get_attack  # noqa: E402
from leakaudit.data.io import write_jsonl  # noqa: E402
from leakaudit.metrics import spearman_with_ci  # noqa: E402
from leakaudit.models import load_model, resolve_dtype  # noqa: E402
from leakaudit.models.dtype import cpu_has_fast_bf16  # noqa: E402
from leakaudit.scoring import score_texts  # noqa: E402

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "ref")


def cpu_kind() -> str:
    """The CPU's model name (/proc/cpuinfo) and whether it has fast bf16 (the probe dtype `auto` uses)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    return f"{name}, {'fast bf16 (AMX/AVX512-BF16)' if cpu_has_fast_bf16() else 'no native bf16'}"


def mimir_style(target, reference, texts: list[str], k: float = 0.2) -> dict[str, list[float]]:
    """Per text: one target forward keeping the full distribution, the 5 attacks from it, one reference forward."""
    out: dict[str, list[float]] = {a: [] for a in ATTACKS}
    with torch.no_grad():
        for text in texts:
            ids = target.tokenizer(text, return_tensors="pt").input_ids.to(target.device)
            logp_all = torch.log_softmax(target.model(ids).logits[0, :-1].float(), dim=-1)
            tok = logp_all.gather(-1, ids[0, 1:, None])[:, 0]
            probs = logp_all.exp()
            mu = (probs * logp_all).sum(-1)
            var = (probs * logp_all.square()).sum(-1) - mu.square()
            n = max(1, int(k * tok.numel()))
            loss = tok.mean().item()
            out["loss"].append(loss)
            out["zlib"].append(loss / len(zlib.compress(text.encode("utf-8"))))
            out["min_k"].append(tok.sort().values[:n].mean().item())
            z = (tok - mu) / var.clamp_min(1e-12).sqrt()
            out["min_k_pp"].append(z.sort().values[:n].mean().item())
            rids = reference.tokenizer(text, return_tensors="pt").input_ids.to(reference.device)
            rlogp = torch.log_softmax(reference.model(rids).logits[0, :-1].float(), dim=-1)
            out["ref"].append(loss - rlogp.gather(-1, rids[0, 1:, None]).mean().item())
    return out


def engine_attacks(target, reference, texts: list[str]) -> dict[str, list[float]]:
    ctx = ScoringContext(target, texts, reference=reference, moments=True,
                         score_options={"cache": False, "progress": False})
    return {a: list(get_attack(a).score(ctx)) for a in ATTACKS}


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    res = fn(*args, **kwargs)
    return time.perf_counter() - t, res


def whole_process(args, texts: list[str], threads: int, tmp: Path, mia: bool = True) -> dict[str, float]:
    """`leakaudit score` (loss statistics) and `leakaudit mia` (5 attacks) as a user runs them, wall time."""
    data = tmp / "texts.jsonl"
    half = len(texts) // 2
    write_jsonl(data, ({"text": t} for t in texts))
    write_jsonl(tmp / "m.jsonl", ({"text": t} for t in texts[:half]))
    write_jsonl(tmp / "n.jsonl", ({"text": t} for t in texts[half:]))
    env = {**os.environ, "LEAKAUDIT_THREADS": str(threads)}
    exe = [sys.executable, "-m", "leakaudit"]
    score_cmd = exe + ["score", "--model", args.model, "--data", str(data), "--out", str(tmp / "s.jsonl"),
                       "--no-cache"]
    mia_cmd = exe + ["mia", "--target", args.model, "--reference", args.model, "--members", str(tmp / "m.jsonl"),
                     "--nonmembers", str(tmp / "n.jsonl"), "--attacks", ",".join(ATTACKS), "--n-bootstrap", "0",
                     "--out", str(tmp / "mia"), "--no-cache"]
    out = {}
    for name, cmd in (("score", score_cmd), ("mia", mia_cmd))[:2 if mia else 1]:
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out[name] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=60)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", default=None)
    ap.add_argument("--score-only", action="store_true",
                    help="only the naive loop, the engine and `leakaudit score` whole-process (large --texts)")
    args = ap.parse_args()

    texts = bench_texts(args.texts)
    lm32 = load_model(args.model, dtype="fp32")
    dtype = resolve_dtype(None, lm32.device)
    lm = lm32 if dtype == torch.float32 else load_model(args.model, dtype=dtype)
    dname = "bf16" if dtype == torch.bfloat16 else "fp32"
    n_tok = [len(lm32.tokenizer(t)["input_ids"]) for t in texts]
    tokens = sum(n_tok)
    flops = forward_flops(lm32.model, n_tok)
    print(f"CPU: {cpu_kind()}\nmodel={args.model} texts={len(texts)} tokens={tokens} engine dtype={dname}")

    results = {"cpu": cpu_kind(), "model": args.model, "texts": len(texts), "tokens": tokens,
               "engine_dtype": dname, "runs": []}
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads)
        peaks = {"fp32": matmul_peak(torch.float32, lm32.device), "bf16": matmul_peak(torch.bfloat16, lm32.device)}
        if lm32.device.type == "cpu" and threads > 1:  # the engine runs one batch per thread (its batch workers)
            peaks["bf16, one matmul per thread"] = matmul_peak_per_thread(torch.bfloat16, threads)
        naive_loop(lm32, texts[:2])
        score_texts(lm, texts[:4], cache=False, progress=False)  # warm-ups
        t_naive, naive = timed(naive_loop, lm32, texts)
        if args.score_only:
            t_loss = timed(score_texts, lm, texts, cache=False, progress=False)[0]
            with tempfile.TemporaryDirectory() as tmp:
                t_proc = whole_process(args, texts, threads, Path(tmp), mia=False)["score"]
            run = {"threads": threads, "seconds": {"naive loop, fp32, scoring time": t_naive,
                                                   "engine score_texts, scoring time": t_loss,
                                                   "leakaudit score, whole process": t_proc},
                   "ratios": {"engine / naive (scoring time)": t_naive / t_loss,
                              "leakaudit score whole process / naive scoring time": t_naive / t_proc},
                   "start-up, load, tokenise, write (s)": t_proc - t_loss}
            results["runs"].append(run)
            print(json.dumps(run, indent=2))
            continue
        t_loss = statistics.median(timed(score_texts, lm, texts, cache=False, progress=False)[0] for _ in range(3))
        t_mimir32, mimir32 = timed(mimir_style, lm32, lm32, texts)
        t_mimir, _ = (t_mimir32, mimir32) if lm is lm32 else timed(mimir_style, lm, lm, texts)
        t_engine, engine = timed(engine_attacks, lm, lm, texts)
        with tempfile.TemporaryDirectory() as tmp:
            proc = whole_process(args, texts, threads, Path(tmp))
        gflops = flops / t_loss / 1e9
        run = {
            "threads": threads,
            "matmul_peak_gflops": peaks,
            "tokens_per_s": {
                "naive loop, fp32, loss only": tokens / t_naive,
                "engine score_texts, loss only": tokens / t_loss,
                "mimir-style, fp32, 5 attacks": tokens / t_mimir32,
                f"mimir-style, {dname}, 5 attacks": tokens / t_mimir,
                "engine, 5 attacks": tokens / t_engine,
                "leakaudit score (whole process)": tokens / proc["score"],
                "leakaudit mia, 5 attacks (whole process)": tokens / proc["mia"],
            },
            "engine_gflops": gflops,
            "engine_share_of_bf16_peak": gflops / peaks["bf16"],
            "engine_share_of_best_bf16_peak": gflops / max(v for k, v in peaks.items() if k.startswith("bf16")),
            "engine_share_of_fp32_peak": gflops / peaks["fp32"],
            "ratios": {
                "engine / naive (scoring time)": t_naive / t_loss,
                "leakaudit score whole process / naive scoring time": t_naive / proc["score"],
                "engine 5 attacks / mimir-style fp32": t_mimir32 / t_engine,
                f"engine 5 attacks / mimir-style {dname}": t_mimir / t_engine,
                "leakaudit mia whole process / mimir-style fp32 scoring time": t_mimir32 / proc["mia"],
            },
            "agreement_spearman_engine_vs_mimir_fp32": {
                a: spearman_with_ci(engine[a], mimir32[a], n_bootstrap=0)["rho"] for a in ATTACKS},
            "max_abs_diff_loss_naive_vs_mimir_fp32": max(
                abs(n / max(1, c - 1) - m) for n, c, m in zip(naive, n_tok, mimir32["loss"], strict=True)),
        }
        results["runs"].append(run)
        print(json.dumps(run, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
