"""Speed of DGC's training step and prediction against hand-written PyTorch and a Python loop (issue 5).

Prints one table and optionally writes the figures as JSON:

- train examples/s of (a) our fast SVI step (``engine="graph"``, the default of ``fit``: the Pyro
  model/guide step captured once and replayed), (a') the step that traces the Pyro model/guide every step
  (``engine="torch"``, fit's fallback and the data-parallel engine), (a'') textbook ``pyro.infer.SVI`` (``engine="svi"``) and (b) a hand-written
  pure-PyTorch step that computes the identical negative ELBO with the same networks, likelihood,
  optimiser and batch; ``train_ratio`` = step time (a) / step time (b), ``train_ratio_torch_engine`` =
  (a') / (b); with ``--compile`` also (a) with its graph compiled by ``torch.compile``;
- prediction examples/s of :func:`dgc_pyro.inference.predict` for S in {1, 10, 100} latent draws per
  class, and of :func:`predict_loop` (a Python loop over draws and classes) at S = 10;
  ``predict_speedup_s10`` = vectorised / loop examples/s;
- peak memory: process RSS (``resource.getrusage``) and, on CUDA, ``torch.cuda.max_memory_allocated``.

Timing: warm-up steps first, then ``--repeats`` rounds in which every contender runs ``--steps`` steps
back to back (interleaved, so that a load spike from other processes hits all of them alike);
``torch.cuda.synchronize`` brackets every timed block on CUDA. Step times are medians over rounds and
ratios are medians of the per-round ratios.

Example::

    .venv/bin/python benchmarks/speed.py --device cpu --shape 1,28,28 --preset small --batch-size 100 --json speed.json
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from torch.nn import functional as F

from dgc_pyro.inference.device import resolve_device
from dgc_pyro.inference.engine import make_step
from dgc_pyro.inference.objectives import get_objective
from dgc_pyro.inference.predict import posterior_from_log_weights, predict
from dgc_pyro.io import write_json
from dgc_pyro.models.dgc import DGC

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


# ----------------------------------------------------------------------------- hand-written reference
def _normal_log_prob(value: torch.Tensor, loc: torch.Tensor | float, scale: torch.Tensor | float) -> torch.Tensor:
    """Elementwise log N(value | loc, scale), written as torch.distributions.Normal.log_prob does."""
    var = scale**2
    log_scale = math.log(scale) if isinstance(scale, (int, float)) else scale.log()
    return -((value - loc) ** 2) / (2 * var) - log_scale - _LOG_SQRT_2PI


def handwritten_loss(model: DGC, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example mean negative ELBO of DGC in plain PyTorch (no Pyro), one reparameterised draw.

    -log p(x | z) - label_weight * log p(y | z) + log q(z | x, y) - log p(z), with
    z = loc + eps * scale from ``model.encoder(x, onehot(y))``, the same networks and likelihood as
    the Pyro model/guide. ``eps`` defaults to ``torch.empty_like(loc).normal_()``: the same draw as
    ``pyro.sample`` of a Normal guide under the same seed.
    """
    onehot = F.one_hot(y.long(), model.num_classes).to(x.dtype)
    loc, scale = model.encoder(x, onehot)
    if eps is None:
        eps = torch.empty_like(loc).normal_()
    z = loc + eps * scale
    out = model.decoder(z)
    dims = tuple(range(1, x.dim()))
    if model.likelihood_name == "bernoulli":
        log_px = -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(dims)
    elif model.likelihood_name == "normal":
        log_px = _normal_log_prob(x, torch.sigmoid(out), model.obs_scale).sum(dims)
    elif model.likelihood_name == "continuous_bernoulli":
        cb = torch.distributions.ContinuousBernoulli(logits=out.clamp(-15.0, 15.0), validate_args=False)
        log_px = cb.log_prob(x).sum(dims)
    else:
        raise ValueError(f"no hand-written likelihood {model.likelihood_name!r}")
    log_py = -F.cross_entropy(model.classifier(z), y.long(), reduction="none")
    log_pz = _normal_log_prob(z, 0.0, 1.0).sum(-1)
    log_qz = _normal_log_prob(z, loc, scale).sum(-1)
    return -(log_px + model.label_weight * log_py + log_pz - log_qz).mean()


def make_handwritten_step(
    model: DGC, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999)
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A training step over :func:`handwritten_loss` with the engine's optimiser (fused Adam on CUDA, foreach on CPU)."""
    fused = model.device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, foreach=not fused, fused=fused or None)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = handwritten_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ----------------------------------------------------------------------------- loop reference of prediction
@torch.no_grad()
def predict_loop(model: DGC, x: torch.Tensor, num_samples: int = 10, *, rule: str = "mixture") -> torch.Tensor:
    """Reference of :func:`dgc_pyro.inference.predict`'s log weights: a Python loop over draws and classes.

    One Pyro guide + model trace per (draw s, class c) on all examples; draws are taken in the order
    (s outer, c inner), the order in which the vectorised pass lays out its noise, so the same seed
    gives the same draws on CPU. Returns log weights ``(N, C, D)`` (D = S*C for ``"mixture"``, else S);
    ``posterior_from_log_weights(...).proba`` gives the class posterior.
    """
    was_training = model.training
    model.eval()
    x = x.to(model.device)
    n, num_classes = x.shape[0], model.num_classes
    draws = []  # per (s, c): z, log p(x|z) + log p(z), log p(y=c|z), logits, loc, scale, log q(z)
    try:
        with pyro.settings.context(module_local_params=True):
            for _ in range(num_samples):
                for c in range(num_classes):
                    yc = torch.full((n,), c, dtype=torch.long, device=x.device)
                    guide_tr = poutine.trace(model.guide).get_trace(x, yc)
                    model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x, yc)
                    z = guide_tr.nodes["z"]["value"]
                    q = guide_tr.nodes["z"]["fn"]
                    while hasattr(q, "base_dist"):
                        q = q.base_dist
                    draws.append(
                        {
                            "z": z,
                            "log_px": model_tr.nodes["x"]["fn"].log_prob(x),
                            "log_pz": model_tr.nodes["z"]["fn"].log_prob(z),
                            "log_py": model_tr.nodes["y"]["fn"].log_prob(yc),
                            "log_q": guide_tr.nodes["z"]["fn"].log_prob(z),
                            "loc": q.loc,
                            "scale": q.scale,
                        }
                    )
    finally:
        model.train(was_training)
    if rule == "mixture":
        locs = [d["loc"] for d in draws[:num_classes]]
        scales = [d["scale"] for d in draws[:num_classes]]
        columns = []
        for d in draws:
            log_q_each = torch.stack(
                [torch.distributions.Normal(lc, sc).log_prob(d["z"]).sum(-1) for lc, sc in zip(locs, scales)], -1
            )
            log_q_mix = torch.logsumexp(log_q_each, -1) - math.log(num_classes)
            log_py_all = torch.log_softmax(model.label_logits(d["z"]), -1)  # (n, C)
            columns.append((d["log_px"] + d["log_pz"] - log_q_mix)[:, None] + log_py_all)
        return torch.stack(columns, -1)  # (n, C, S*C)
    per_class: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    for i, d in enumerate(draws):
        w = d["log_px"] + d["log_py"]
        if rule == "iw":
            w = w + d["log_pz"] - d["log_q"]
        per_class[i % num_classes].append(w)
    return torch.stack([torch.stack(ws, -1) for ws in per_class], 1)  # (n, C, S)


def predict_loop_proba(model: DGC, x: torch.Tensor, num_samples: int = 10, *, rule: str = "mixture") -> torch.Tensor:
    """Class posterior from :func:`predict_loop`."""
    return posterior_from_log_weights(predict_loop(model, x, num_samples, rule=rule)).proba


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(
    contenders: dict[str, Callable[[int], None]],
    steps: int,
    repeats: int,
    device: torch.device,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds per call of every contender, one list entry per round; contenders alternate within a
    round. ``cpu_times`` (if given) collects the process CPU seconds per call alongside, a figure that
    other processes competing for the cores disturb much less than wall time."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(steps):
                run(i)
            _sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append((time.process_time() - c0) / steps)
    return times


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _spread(values: list[float]) -> float:
    """Relative half-range (max - min) / (2 * median) of a list of timings."""
    med = statistics.median(values)
    return (max(values) - min(values)) / (2 * med) if med > 0 else 0.0


def make_model(
    shape: tuple[int, ...], num_classes: int, latent_dim: int, preset: str, likelihood: str, device: torch.device
) -> DGC:
    torch.manual_seed(0)
    return DGC(shape, num_classes, latent_dim=latent_dim, preset=preset, likelihood=likelihood).to(device)


def bench_train(
    model: DGC,
    batch_size: int,
    steps: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    num_batches: int = 8,
    compile_graph: bool | dict[str, object] = False,
) -> dict[str, object]:
    """Seconds per training step of our engines and of the hand-written step on the same batches.

    Contenders: ``ours`` (``engine="torch"``, the Pyro model and guide traced every step), ``graph``
    (``engine="graph"``, the same step captured once and replayed), ``hand`` (hand-written PyTorch), with
    ``compile_graph`` also ``graph_compiled`` (the captured graph through ``torch.compile``), and, timed
    in separate rounds, ``svi`` (textbook ``pyro.infer.SVI``).
    """
    shape, c = model.input_shape, model.num_classes
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.rand((batch_size, *shape), generator=gen).to(device),
            torch.randint(0, c, (batch_size,), generator=gen).to(device),
        )
        for _ in range(num_batches)
    ]
    ones = torch.ones(c, dtype=torch.long, device=device)
    names = ("ours", "graph", "svi", "hand") + (("graph_compiled",) if compile_graph else ())
    models = {k: copy.deepcopy(model) for k in names}
    for m in models.values():
        m.train()

    def engine_step(name: str, engine: str, **options: object):
        return make_step(
            models[name], get_objective("elbo"), engine, 1e-3, (0.9, 0.999), 1e-3, False, ones, device, **options
        )

    steps_fn = {
        "ours": engine_step("ours", "torch"),
        "graph": engine_step("graph", "graph"),
        "svi": engine_step("svi", "svi"),
        "hand": make_handwritten_step(models["hand"]),
    }
    if compile_graph:
        steps_fn["graph_compiled"] = engine_step("graph_compiled", "graph", compile=compile_graph)
    runs = {k: (lambda i, f=f: f(*batches[i % num_batches])) for k, f in steps_fn.items()}
    out: dict[str, object] = {}
    with pyro.settings.context(module_local_params=True):
        for name, f in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            f(0)  # the graph engines capture (and compile) on their first step
            _sync(device)
            out[f"train_first_step_s_{name}"] = time.perf_counter() - t0
            for i in range(1, warmup):
                f(i)
        cpu: dict[str, list[float]] = {}
        times = _interleaved({k: v for k, v in runs.items() if k != "svi"}, steps, repeats, device, cpu)
        times.update(_interleaved({"svi": runs["svi"]}, max(1, steps // 2), max(1, repeats // 2), device))
    out.update({f"train_step_s_{k}": statistics.median(v) for k, v in times.items()})
    out.update({f"train_examples_per_s_{k}": batch_size / statistics.median(v) for k, v in times.items()})
    # train_ratio: the fast engine (engine="graph") against the hand-written step; the per-step-tracing
    # engine and the compiled graph beside it.
    out["train_ratio"] = _median_ratio(times["graph"], times["hand"])
    out["train_ratio_rounds"] = [round(a / b, 4) for a, b in zip(times["graph"], times["hand"])]
    out["train_ratio_cpu_time"] = _median_ratio(cpu["graph"], cpu["hand"])
    out["train_ratio_torch_engine"] = _median_ratio(times["ours"], times["hand"])
    out["train_ratio_torch_engine_cpu_time"] = _median_ratio(cpu["ours"], cpu["hand"])
    if compile_graph:
        out["train_ratio_graph_compiled"] = _median_ratio(times["graph_compiled"], times["hand"])
    out["train_ratio_svi"] = statistics.median(times["svi"]) / statistics.median(times["hand"])
    out["train_spread_hand"] = _spread(times["hand"])
    return out


def bench_predict(
    model: DGC,
    num_examples: int,
    samples: tuple[int, ...],
    repeats: int,
    device: torch.device,
    loop_samples: int = 10,
    autocast: str | None = None,
) -> dict[str, float]:
    """Examples/s of vectorised prediction for each S, and of the loop reference at ``loop_samples``."""
    model.eval()
    x = torch.rand((num_examples, *model.input_shape), generator=torch.Generator().manual_seed(1))
    extra = {"autocast": autocast} if autocast else {}
    samples = tuple(sorted(set(samples) | {loop_samples}))
    runs: dict[str, Callable[[int], None]] = {
        f"vec_s{s}": (lambda i, s=s: predict(model, x, s, **extra)) for s in samples
    }
    runs[f"loop_s{loop_samples}"] = lambda i: predict_loop_proba(model, x, loop_samples)
    if autocast:  # the float32 figure beside the autocast one
        runs[f"vec_s{loop_samples}_fp32"] = lambda i: predict(model, x, loop_samples)
    has_conv = any(p.dim() == 4 for p in model.parameters())
    if has_conv:  # separate the layout's share of the speed-up from the vectorisation's
        runs[f"vec_s{loop_samples}_nchw"] = lambda i: predict(model, x, loop_samples, channels_last=False, **extra)
    for f in runs.values():
        f(0)  # warm-up
    times = _interleaved(runs, 1, repeats, device)
    out = {f"predict_examples_per_s_{k}": num_examples / statistics.median(v) for k, v in times.items()}
    vec, loop = times[f"vec_s{loop_samples}"], times[f"loop_s{loop_samples}"]
    out[f"predict_speedup_s{loop_samples}"] = _median_ratio(loop, vec)
    if autocast:
        out[f"predict_speedup_s{loop_samples}_fp32"] = _median_ratio(loop, times[f"vec_s{loop_samples}_fp32"])
    if has_conv:
        out[f"predict_speedup_s{loop_samples}_nchw"] = _median_ratio(loop, times[f"vec_s{loop_samples}_nchw"])
    return out


def _peak_memory(device: torch.device) -> dict[str, float]:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"peak_rss_mib": rss_kib / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", default="1,28,28", help="input shape, e.g. 1,28,28 (conv) or 1,8,8 (digits MLP)")
    p.add_argument("--preset", choices=("small", "paper"), default="small")
    p.add_argument("--likelihood", default="bernoulli")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--latent-dim", type=int, default=None, help="default: 64, or 16 for inputs of at most 64 values")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (few: contenders alternate often)")
    p.add_argument("--repeats", type=int, default=21, help="rounds (medians are taken over rounds)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--predict-examples", type=int, default=100)
    p.add_argument("--predict-repeats", type=int, default=3)
    p.add_argument("--samples", default="1,10,100", help="latent draws per class for the prediction rows")
    p.add_argument(
        "--autocast",
        choices=("none", "bf16"),
        default="none",
        help="prediction autocast (CUDA; CPUs with AMX/AVX512-BF16)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time engine='graph' with its captured graph compiled by torch.compile (inductor)",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of --compile (e.g. reduce-overhead: CUDA graphs on the GPU)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.compile_mode is not None and not args.compile:
        # The mode only reaches torch.compile through --compile; without it the JSON would record a mode never used.
        p.error("--compile-mode has no effect without --compile: add --compile or drop --compile-mode")

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    latent = args.latent_dim or (16 if math.prod(shape) <= 64 else 64)
    model = make_model(shape, args.num_classes, latent, args.preset, args.likelihood, device)
    samples = tuple(int(s) for s in args.samples.split(","))
    autocast = None if args.autocast == "none" else args.autocast

    figures: dict[str, object] = {
        "device": str(device),
        "shape": list(shape),
        "preset": args.preset,
        "likelihood": args.likelihood,
        "latent_dim": latent,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "autocast": autocast,
        "predict_examples": args.predict_examples,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    figures.update(
        bench_train(
            model,
            args.batch_size,
            args.steps,
            args.repeats,
            args.warmup,
            device,
            compile_graph=({"mode": args.compile_mode} if args.compile_mode else True) if args.compile else False,
        )
    )
    figures.update(
        bench_predict(model, args.predict_examples, samples, args.predict_repeats, device, autocast=autocast)
    )
    figures.update(_peak_memory(device))

    rows = [
        (
            "train (a)  ours, engine='graph'",
            figures["train_examples_per_s_graph"],
            f"capture {figures['train_first_step_s_graph']:.2f} s",
        ),
        (
            "train (a') ours, engine='torch'",
            figures["train_examples_per_s_ours"],
            f"{figures['train_ratio_torch_engine']:.3f} x hand step time",
        ),
        (
            "train (a'') engine='svi'",
            figures["train_examples_per_s_svi"],
            f"{figures['train_ratio_svi']:.3f} x hand step time",
        ),
        ("train (b)  hand-written PyTorch", figures["train_examples_per_s_hand"], ""),
        (
            "train_ratio (a)/(b) step time",
            None,
            f"{figures['train_ratio']:.3f} (CPU-time ratio {figures['train_ratio_cpu_time']:.3f})",
        ),
    ]
    if "train_ratio_graph_compiled" in figures:
        rows.append(
            (
                "train (a) graph + torch.compile",
                figures["train_examples_per_s_graph_compiled"],
                f"ratio {figures['train_ratio_graph_compiled']:.3f}, "
                f"capture+compile {figures['train_first_step_s_graph_compiled']:.1f} s",
            )
        )
    for s in samples:
        rows.append((f"predict vectorised S={s}", figures[f"predict_examples_per_s_vec_s{s}"], ""))
    if "predict_examples_per_s_vec_s10_nchw" in figures:
        rows.append(
            (
                "predict vectorised S=10, NCHW weights",
                figures["predict_examples_per_s_vec_s10_nchw"],
                f"speed-up {figures['predict_speedup_s10_nchw']:.2f} (vectorisation alone)",
            )
        )
    if "predict_examples_per_s_vec_s10_fp32" in figures:
        rows.append(
            (
                "predict vectorised S=10, float32",
                figures["predict_examples_per_s_vec_s10_fp32"],
                f"speed-up {figures['predict_speedup_s10_fp32']:.2f} (without autocast)",
            )
        )
    rows.append(("predict loop S=10", figures["predict_examples_per_s_loop_s10"], ""))
    rows.append(("predict_speedup_s10", None, f"{figures['predict_speedup_s10']:.2f}"))
    rows.append(("peak RSS (MiB)", None, f"{figures['peak_rss_mib']:.0f}"))
    if "cuda_max_allocated_mib" in figures:
        rows.append(("CUDA max allocated (MiB)", None, f"{figures['cuda_max_allocated_mib']:.0f}"))
    print(
        f"device={device} shape={shape} preset={args.preset} batch={args.batch_size} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} pyro={pyro.__version__}"
    )
    print(f"{'what':<36} {'examples/s':>12}  note")
    for name, eps, note in rows:
        print(f"{name:<36} {'' if eps is None else f'{eps:12.1f}':>12}  {note}")
    if args.json:
        write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
