"""Does it work on CUDA? The checks that matter, one JSON record each, before any speed is measured.

    python benchmarks/gpu_check.py --out gpu_out            # on a GPU machine (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_check.py --dry_run --out gpu_out  # on a CPU: every check that can run does, at tiny size

Checks (each record: name, passed, the measured numbers, the tolerance it was held to, seconds):

* networks: EDM DDPM++, ADM and EDM2 denoisers on CUDA in fp32 against the CPU (relative L2 <= 1e-4, TF32 off), and
  in fp16 (the networks' own float16 path, <= 1e-2) and bf16 autocast (<= 3e-2) against CUDA fp32;
* losses: every loss function on CUDA against the CPU (<= 1e-5);
* iteration: one stage-3 SiDA iteration (fake score + discriminator, generator, EMA) from identical state, random
  numbers drawn on the CPU for both, on CUDA-fp32 against CPU-fp32, EDM and EDM2 (four losses within 1e-4);
* compile: the same iteration with `--compile` (inductor) against eager (1e-4); fsdp: with `--fsdp` on one process
  against the unsharded run (1e-5);
* digits: a 2-kimg run of the digits preset (`examples/train_sida.py`) in bf16 and in fp16, finite losses and the
  FD-digits of the student and its teacher;
* memory: peak `torch.cuda.max_memory_allocated` of full-size EDM2-XS/S iterations against the memory plan, DDP and
  FSDP on one process (the plan is held to 20 %).

With `--dry_run` (no GPU) the CUDA side is replaced by the CPU where that still exercises the code, and what needs
CUDA (fp16 kernels, CUDA memory statistics, inductor's GPU kernels) is skipped and listed in `skipped`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import build_teacher, synthetic_dataset  # noqa: E402

from sida_diffusers.training.memory_plan import GB, make_plan, rounds_for  # noqa: E402


LOSSES = ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss")


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(b, dtype=torch.float64).cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def cpu_random(seed: int):
    """torch.randn/rand/randint(_like) drawn on the CPU from one generator and moved to their device: a CUDA and a CPU
    run then see the same noise, noise levels and labels."""
    gen = torch.Generator().manual_seed(seed)
    originals = {name: getattr(torch, name) for name in ("randn", "rand", "randint", "randn_like", "rand_like")}

    def draw(name):
        def fn(*args, device=None, generator=None, dtype=None, **kwargs):
            if name.endswith("_like"):
                like = args[0]
                return originals[name[:-5]](like.shape, generator=gen, dtype=dtype or like.dtype).to(device or like.device)
            kwargs.pop("layout", None)
            out = originals[name](*args, generator=gen, **({"dtype": dtype} if dtype else {}), **kwargs)
            return out.to(device) if device is not None else out
        return fn

    for name in originals:
        setattr(torch, name, draw(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


# ---- the worker: one iteration in a fresh process ----------------------------------------------------------------

def iteration_worker(args) -> dict:
    """Build the trainer for `--preset` on `--device`, move it to stage 3, run `--iters` iterations with CPU-drawn
    random numbers, print the losses (and, with --memory, the CUDA peak against the plan)."""
    from bench_train import PRESETS

    from sida_diffusers.training import SiDATrainer, make_config

    torch.manual_seed(0)
    teacher = build_teacher(args.preset, tiny=args.tiny)
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(preset=PRESETS[args.preset]["train_preset"], teacher=args.preset, train_data="synthetic",
                          train_batch_size=args.batch, total_batch_size=args.batch, mixed_precision=args.precision,
                          dropout=0.0, compile=args.compile, compile_backend=args.compile_backend, fsdp=args.fsdp,
                          cpu=not cuda, sample_grid_size=0, eval_every_kimg=0, seed=0, output_dir=tmp)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = SiDATrainer(cfg, teacher=teacher, dataset=synthetic_dataset(teacher))
        trainer.cur_nimg = int(max(cfg.warmup_kimg, cfg.adversarial_start_kimg) * 1000) + 1
        with torch.no_grad(), cpu_random(1):  # a fake score unlike the teacher: no cancellation in the SiD loss
            for p in trainer.unwrap(trainer.fake_score).parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(0.02 * torch.randn(local.shape, device=local.device))
        record = {"preset": args.preset, "device": args.device, "precision": args.precision}
        with cpu_random(2):
            for _ in range(args.iters):
                trainer.step()
        record["losses"] = {k: float(v) for k, v in trainer.last_losses.items()}
        if args.memory and cuda:
            torch.cuda.synchronize()
            plan = make_plan(cfg, lambda: build_teacher(args.preset, tiny=args.tiny), fused_adam=True)
            record.update(peak_gb=torch.cuda.max_memory_allocated() / GB,
                          planned_gb=plan.peak(cfg.fsdp, 1, cfg.train_batch_size, rounds_for(cfg, 1)) / GB)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(json.dumps(record), flush=True)
    return record


def run_worker(*flags, env=None, timeout=600) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *map(str, flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(map(str, flags))} failed: {proc.stderr[-1500:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def compare_losses(a: dict, b: dict, tolerance: float) -> dict:
    errors = {k: abs(a["losses"][k] - b["losses"][k]) / max(abs(b["losses"][k]), 1e-12) for k in b["losses"]}
    finite = all(v == v and abs(v) != float("inf") for v in [*a["losses"].values(), *b["losses"].values()])
    return {"passed": finite and max(errors.values()) <= tolerance, "rel_errors": errors, "tolerance": tolerance,
            "losses": a["losses"], "reference_losses": b["losses"]}


# ---- the checks ---------------------------------------------------------------------------------------------------

def check_networks(ctx) -> dict:
    dev, results, passed = ctx.device, {}, True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for preset in ("cifar10", "imagenet64", "edm2-xs"):
        torch.manual_seed(0)
        net = build_teacher(preset, tiny=ctx.dry_run).eval()
        c, r = net.img_channels, net.img_resolution
        g = torch.Generator().manual_seed(0)
        x, sigma = torch.randn(4, c, r, r, generator=g), torch.tensor([0.05, 0.5, 2.0, 40.0])
        labels = torch.eye(net.label_dim)[:4] if net.label_dim else None
        with torch.no_grad():
            ref = net(x, sigma, labels, return_flag="encoder_decoder")
            netd = net.to(dev)
            move = lambda t: None if t is None else t.to(dev)
            fp32 = netd(move(x), move(sigma), move(labels), return_flag="encoder_decoder")
            out = {"fp32_vs_cpu": max(rel_err(a, b) for a, b in zip(fp32, ref))}
            with torch.autocast(dev, dtype=torch.bfloat16):
                bf16 = netd(move(x), move(sigma), move(labels), return_flag="encoder_decoder")
            out["bf16_vs_fp32"] = max(rel_err(a, b) for a, b in zip(bf16, fp32))
            if dev == "cuda":
                netd.register_to_config(use_fp16=True)
                fp16 = netd(move(x), move(sigma), move(labels), return_flag="encoder_decoder")
                out["fp16_vs_fp32"] = max(rel_err(a, b) for a, b in zip(fp16, fp32))
        ok = out["fp32_vs_cpu"] <= 1e-4 and out["bf16_vs_fp32"] <= 3e-2 and out.get("fp16_vs_fp32", 0) <= 1e-2
        results[preset], passed = out, passed and ok
    return {"passed": passed, "errors": results, "tolerance": {"fp32_vs_cpu": 1e-4, "fp16_vs_fp32": 1e-2,
                                                               "bf16_vs_fp32": 3e-2},
            "skipped": [] if ctx.device == "cuda" else ["fp16: the networks' float16 path runs on CUDA only"]}


def check_losses(ctx) -> dict:
    from sida_diffusers import losses

    g = torch.Generator().manual_seed(0)
    x, dt, df = (torch.randn(8, 3, 8, 8, generator=g) for _ in range(3))
    logits_r, logits_f = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    sigma, logvar = torch.rand(8, 1, 1, 1, generator=g) * 5 + 0.01, torch.randn(8, 1, 1, 1, generator=g) * 0.1
    calls = {"fake_score": lambda d, *a: losses.fake_score_loss(a[0], a[1], d(sigma), d(logvar), 0.5),
             "discriminator": lambda d, *a: losses.discriminator_loss(d(logits_r), d(logits_f), d(sigma), d(logvar), 0.5),
             "sid_generator": lambda d, *a: losses.sid_generator_loss(a[0], a[1], a[2], 1.2, d(logvar)),
             "sida_adversarial": lambda d, *a: losses.sida_adversarial_loss(d(logits_f), a[0], a[1], d(logvar))}
    errors = {}
    for name, fn in calls.items():
        on = lambda dev: (lambda t: t.to(dev))
        ref = fn(on("cpu"), x, dt, df)
        got = fn(on(ctx.device), x.to(ctx.device), dt.to(ctx.device), df.to(ctx.device))
        errors[name] = rel_err(got, ref)
    return {"passed": max(errors.values()) <= 1e-5, "rel_errors": errors, "tolerance": 1e-5}


def check_iteration(ctx) -> dict:
    """Identical state and random numbers: CUDA fp32 against CPU fp32, EDM and EDM2."""
    out = {}
    for preset in ("cifar10", "edm2-xs"):
        common = ("--preset", preset, "--tiny", "--batch", 4)
        device = run_worker(*common, "--device", ctx.device)
        cpu = device if ctx.dry_run else run_worker(*common, "--device", "cpu", env={"CUDA_VISIBLE_DEVICES": ""})
        out[preset] = compare_losses(device, cpu, 1e-4)
    return {"passed": all(r["passed"] for r in out.values()), "presets": out,
            "skipped": ["the CPU reference run (the dry run's device is the CPU)"] if ctx.dry_run else []}


def check_compile(ctx) -> dict:
    backend = "aot_eager" if ctx.dry_run else "inductor"
    common = ("--preset", "cifar10", "--tiny", "--batch", 4, "--device", ctx.device)
    compiled = run_worker(*common, "--compile", "--compile_backend", backend, timeout=900)
    return {**compare_losses(compiled, run_worker(*common), 1e-4), "backend": backend,
            "skipped": ["inductor's kernels (dry run compiles with aot_eager)"] if ctx.dry_run else []}


def check_fsdp(ctx) -> dict:
    common = ("--preset", "edm2-xs", "--tiny", "--batch", 4, "--device", ctx.device)
    return compare_losses(run_worker(*common, "--fsdp"), run_worker(*common), 1e-5)


def check_digits(ctx) -> dict:
    """2 kimg of the digits preset in bf16 and fp16 through the real command (examples/train_sida.py)."""
    kimg, samples = ("0.064", "128") if ctx.dry_run else ("2", "1797")
    runs = {}
    for precision in ("bf16", "fp16"):
        out = ctx.out / "work" / f"digits_{precision}"
        cmd = [sys.executable, str(HERE.parent / "examples" / "train_sida.py"), "--max_train_kimg", kimg,
               "--eval_every_kimg", kimg, "--checkpointing_kimg", kimg, "--log_every_kimg", kimg,
               "--eval_num_samples", samples, "--mixed_precision", precision, "--seed", "0", "--output_dir", str(out),
               *(["--cpu"] if ctx.dry_run else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            runs[precision] = {"passed": False, "error": proc.stderr[-1500:]}
            continue
        stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        student, teacher = (summary.get(k, {}).get("metrics") or {} for k in ("student", "teacher_eval"))
        finite = all(abs(s[k]) < float("inf") and s[k] == s[k] for s in stats for k in LOSSES if k in s)
        runs[precision] = {"passed": finite and bool(student), "losses": stats[-1], "fd_digits": student,
                           "teacher_fd_digits": teacher}
    return {"passed": all(r["passed"] for r in runs.values()), "runs": runs, "kimg": float(kimg),
            "skipped": ["fp16: CPU runs the networks in fp32 (use_fp16 is a CUDA path)"] if ctx.dry_run else []}


def check_memory(ctx) -> dict:
    if ctx.dry_run:
        return {"passed": True, "skipped": ["CUDA memory statistics"]}
    out = {}
    for preset, batch in (("edm2-xs", 16), ("edm2-s", 16)):
        for fsdp in (False, True):
            r = run_worker("--preset", preset, "--batch", batch, "--precision", "fp16", "--device", "cuda",
                           "--memory", "--iters", 2, *(["--fsdp"] if fsdp else []))
            r["plan_error"] = r["planned_gb"] / r["peak_gb"] - 1
            out[f"{preset}{' fsdp' if fsdp else ''}"] = r
    return {"passed": all(abs(r["plan_error"]) <= 0.2 for r in out.values()), "runs": out, "tolerance": 0.2}


CHECKS = {"networks": check_networks, "losses": check_losses, "iteration": check_iteration, "fsdp": check_fsdp,
          "digits": check_digits, "memory": check_memory, "compile": check_compile}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    p.add_argument("--dry_run", action="store_true", help="no GPU: run what the CPU can, list what was skipped")
    p.add_argument("--only", default="", help="comma-separated checks (default: all, in order)")
    p.add_argument("--budget_s", type=float, default=360, help="checks that would start later are skipped")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in (("--preset", str), ("--device", str), ("--precision", str), ("--compile_backend", str),
                       ("--batch", int), ("--iters", int)):
        p.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    for flag in ("--tiny", "--compile", "--fsdp", "--memory"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.precision, args.iters = args.precision or "no", args.iters or 1
        args.compile_backend = args.compile_backend or "inductor"
        return iteration_worker(args)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: error: no CUDA device is visible; pass --dry_run to exercise the checks on the CPU.")
    args.device = "cpu" if args.dry_run else "cuda"
    (args.out / "work").mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    start, records = time.time(), []
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": args.dry_run,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for name in names:
        t0 = time.time()
        if t0 - start > args.budget_s:
            record = {"check": name, "passed": None, "skipped": [f"time budget {args.budget_s:g} s spent"]}
        else:
            try:
                record = {"check": name, **CHECKS[name](args)}
            except Exception as error:  # a failed check is a result; the others still run
                record = {"check": name, "passed": False, "error": f"{type(error).__name__}: {error}"[-2000:]}
        record["seconds"] = round(time.time() - t0, 1)
        records.append(record)
        (args.out / "work" / f"check_{name}.json").write_text(json.dumps(record, indent=1))
        print(json.dumps({k: record.get(k) for k in ("check", "passed", "seconds", "skipped", "error")}), flush=True)
    summary = {**env, "passed": all(r["passed"] is not False for r in records), "seconds": round(time.time() - start, 1),
               "checks": {r["check"]: r["passed"] for r in records},
               "skipped": {r["check"]: r["skipped"] for r in records if r.get("skipped")}}
    (args.out / "gpu_check.json").write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
