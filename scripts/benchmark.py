#!/usr/bin/env python
"""Inference and training throughput of a Res2Net variant, each next to an eager float32 NCHW baseline.

Every row is measured in this process on the same weights and the same random input batch: the baseline
(eager, float32, NCHW) and the optimised paths (inference: `res2net.prepare_for_inference` = BatchNorm folded into
the convs + channels_last, optional torch.compile (also with Inductor freezing), optional bf16/fp16 autocast;
training: channels_last, optional compile, optional autocast with a GradScaler for fp16). Variants are measured in
alternating rounds after a warm-up and each row reports the median round, so a slow spell of a shared machine hits
every row alike.

--backends adds inference rows of other runtimes (CPU, fp32): `onnxruntime` runs our ONNX export (res2net.export:
BatchNorm folded) at each --ort-optimizations level; `timm` adds timm's model with the same weights, eager and (with
onnxruntime) exported by timm.utils.onnx, as the reference the "vs timm eager" column divides by.

    python scripts/benchmark.py              # res2net50_26w_4s, batch 16, 224 px, CPU: fp32 (+ bf16 rows if native)
    python scripts/benchmark.py --device cuda --batch-size 256 --precision bf16 --compile
    python scripts/benchmark.py --model res2net50_26w_8s --modes inference --json bench.json
    python scripts/benchmark.py --modes inference --precision fp32 --threads 2 --compile \
        --backends torch,onnxruntime,timm
    python scripts/benchmark.py --device cuda --batch-size 256 --compile --peer timm   # + timm's eager model

On Linux the script re-executes itself once with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 unless they
are set (or --keep-allocator is given): glibc's default allocator swings Res2Net CPU timings by up to 1.8x.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from res2net.errors import run_script

ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("inference", "train")
BACKENDS = ("torch", "onnxruntime", "timm")
BASELINE = "eager fp32 NCHW (baseline)"
TIMM_EAGER = "timm eager fp32 NCHW"


@dataclass
class Row:
    mode: str
    path: str
    img_per_s: float
    ms_per_batch: float
    speedup: float  # over the eager float32 NCHW baseline of the same mode
    vs_timm: float | None = None  # over timm's eager model (--backends timm), inference only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="res2net50_26w_4s", help="variant name (res2net.list_models())")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        choices=["auto", *sorted(PRECISIONS)],
        default="auto",
        help="autocast dtype of the extra optimised rows (the baseline is always float32); auto: bf16 "
        "where the device computes it natively (CUDA, or a CPU with AVX512-BF16/AMX), else fp32",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add rows with torch.compile (inference: also with "
        "Inductor freezing, the weights folded into the compiled graph as constants)",
    )
    p.add_argument(
        "--backends",
        type=_choices(BACKENDS),
        default=["torch"],
        help=f"comma-separated, from {', '.join(BACKENDS)} (default: torch; onnxruntime: inference on the CPU; "
        "timm: its eager model with the same weights)",
    )
    p.add_argument(
        "--ort-optimizations",
        type=_choices(("disable", "basic", "extended", "all")),
        default=["all", "extended"],
        help="ONNX Runtime graph optimisation levels, one row each",
    )
    p.add_argument(
        "--peer",
        choices=["timm"],
        default=None,
        help="add rows of timm's eager float32 NCHW model with the same weights (train and inference; same as "
        "adding timm to --backends)",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per row before measuring")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--base-width", type=int, default=None, help="override (for quick runs of a reduced model)")
    p.add_argument("--scale", type=int, default=None, help="override")
    p.add_argument("--layers", type=int, nargs=4, default=None, help="override, four integers")
    p.add_argument("--json", default=None, help="also write the rows and the environment to this JSON file")
    p.add_argument("--keep-allocator", action="store_true", help="do not re-execute with the allocator settings")
    p.add_argument(
        "--census",
        action="store_true",
        help="instead of timings, print the op census of one steady-state training step per preset "
        "(res2net.engine.census, on the CPU, reduced model): aten ops of the augmentation / mixup / step, host "
        "reads and tensors made from Python data, at each --census-batch size",
    )
    p.add_argument("--census-batch", type=int, nargs="+", default=[8, 256], help="batch sizes of the census")
    p.add_argument("--census-img-size", type=int, default=32, help="image size of the census (>= 32)")
    p.add_argument("--presets", nargs="+", default=None, help="census presets (default: every training preset)")
    args = p.parse_args(argv)
    for name in ("batch_size", "img_size", "iters", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.peer and args.peer not in args.backends:
        args.backends = [*args.backends, args.peer]
    return args


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list from {', '.join(allowed)}")
        return values

    return parse


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def ensure_allocator_env(argv: list[str]) -> None:
    """Re-execute this script with the allocator settings in the environment (glibc reads them at start-up)."""
    if not sys.platform.startswith("linux") or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], {**os.environ, **ALLOCATOR_ENV})


def build_model(args: argparse.Namespace) -> nn.Module:
    import res2net

    torch.manual_seed(0)
    overrides = {"base_width": args.base_width, "scale": args.scale, "layers": args.layers}
    return res2net.create_model(
        args.model, num_classes=args.num_classes, **{k: v for k, v in overrides.items() if v is not None}
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def inference_paths(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Callable]:
    """name -> step function; each runs one forward pass of a batch in inference mode."""
    import res2net

    x = _batch(args, device)[0]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    baseline = copy.deepcopy(model).to(device).eval()

    def step(net: nn.Module, inp: torch.Tensor, precision: str) -> Callable:
        def run():
            with torch.inference_mode(), _autocast(device, precision):
                net(inp)

        return run

    paths = {BASELINE: step(baseline, x, "fp32")}
    reference = timm_reference(baseline, args) if "timm" in args.backends else None
    if reference is not None:
        paths[TIMM_EAGER] = step(reference, x, "fp32")
    if "torch" in args.backends:
        folded = res2net.prepare_for_inference(baseline, channels_last=True)
        paths["folded BN + channels_last"] = step(folded, x_cl, "fp32")
        if args.precision != "fp32":
            paths[f"folded BN + channels_last + {args.precision}"] = step(folded, x_cl, args.precision)
        if args.compile:
            paths[f"folded BN + channels_last{_suffix(args.precision)} + compile"] = step(
                res2net.prepare_for_inference(baseline, channels_last=True, compile=True), x_cl, args.precision
            )
            # Freezing turns the weights into constants of the compiled graph (inference only): Inductor then
            # pre-packs the convolution weights for oneDNN and constant-folds around them.
            frozen = torch.compile(
                res2net.prepare_for_inference(baseline, channels_last=True), options={"freezing": True}
            )
            paths[f"folded BN + channels_last{_suffix(args.precision)} + compile + freezing"] = step(
                frozen, x_cl, args.precision
            )
    if "onnxruntime" in args.backends:
        paths.update(onnxruntime_paths(baseline, reference, x, args))
    return paths


def timm_reference(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """timm's implementation of the variant with the same weights (timm: a test-only dependency)."""
    try:
        import timm
    except ImportError as err:
        raise RuntimeError("--backends timm needs timm: .venv/bin/pip install -r requirements-dev.txt") from err
    from res2net.export import timm_model_args

    overrides = {"base_width": args.base_width, "scale": args.scale, "layers": args.layers}
    reference = timm.create_model(args.model, num_classes=args.num_classes, **timm_model_args(overrides))
    reference.load_state_dict(model.state_dict())
    return reference.eval()


def onnxruntime_paths(
    model: nn.Module, reference: nn.Module | None, x: torch.Tensor, args: argparse.Namespace
) -> dict[str, Callable]:
    """ONNX Runtime on our export (and on timm's export of the reference) at each optimisation level."""
    if x.device.type != "cpu":
        raise ValueError("--backends onnxruntime runs on the CPU: use --device cpu")
    from res2net.export import OnnxRuntimeModel, export_onnx

    threads = args.threads or torch.get_num_threads()
    paths = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"our export (BN folded)": export_onnx(model, os.path.join(tmp, "ours.onnx"), img_size=args.img_size)}
        if reference is not None:
            from timm.utils.onnx import onnx_export

            onnx_export(reference, os.path.join(tmp, "timm.onnx"), example_input=x[:2].clone(), check=True)
            files["timm's export (timm.utils.onnx)"] = os.path.join(tmp, "timm.onnx")
        for label, path in files.items():
            for level in args.ort_optimizations:
                runner = OnnxRuntimeModel(path, threads=threads, optimization=level)  # the session holds the graph
                paths[f"ONNX Runtime, {label}, {level}"] = (lambda r: lambda: r(x))(runner)
    return paths


def _suffix(precision: str) -> str:
    return "" if precision == "fp32" else f" + {precision}"


def _batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The random input batch and labels every row of a run uses."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    return x, torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, precision: str) -> Callable:
    model.train()
    # fused on CUDA, as train.py's optimizer (res2net.engine.optim)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def run():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return run


def train_paths(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Callable]:
    """name -> step function; each runs forward, backward and an SGD update of its own copy of the weights."""
    x, y = _batch(args, device)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def copy_on_device(channels_last: bool) -> nn.Module:
        net = copy.deepcopy(model).to(device)
        return net.to(memory_format=torch.channels_last) if channels_last else net

    paths = {
        "eager fp32 NCHW (baseline)": _train_step(copy_on_device(False), x, y, device, "fp32"),
        "channels_last": _train_step(copy_on_device(True), x_cl, y, device, "fp32"),
    }
    if args.precision != "fp32":
        paths[f"channels_last + {args.precision}"] = _train_step(copy_on_device(True), x_cl, y, device, args.precision)
    if args.compile:
        paths[f"channels_last{_suffix(args.precision)} + compile"] = _train_step(
            torch.compile(copy_on_device(True)), x_cl, y, device, args.precision
        )
    return paths


def peer_train_path(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Callable]:
    """A training step of timm's eager float32 NCHW model with ``model``'s weights (``--backends timm``)."""
    x, y = _batch(args, device)
    return {TIMM_EAGER: _train_step(timm_reference(model, args).to(device).train(), x, y, device, "fp32")}


def measure(paths: dict[str, Callable], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median seconds per batch of each path over alternating rounds, after warm-up."""
    for run in paths.values():
        for _ in range(args.warmup):
            run()
    _synchronize(device)
    rounds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(args.iters):
                run()
            _synchronize(device)
            rounds[name].append((time.perf_counter() - start) / args.iters)
    return {name: statistics.median(times) for name, times in rounds.items()}


def to_rows(mode: str, seconds: dict[str, float], batch_size: int) -> list[Row]:
    base = next(iter(seconds.values()))
    timm_eager = seconds.get(TIMM_EAGER)
    return [
        Row(mode, name, batch_size / s, 1000 * s, base / s, timm_eager / s if timm_eager else None)
        for name, s in seconds.items()
    ]


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "allocator_env": {k: os.environ.get(k) for k in ALLOCATOR_ENV},
    }
    if "onnxruntime" in args.backends:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def markdown_table(rows: list[Row]) -> str:
    with_timm = any(r.vs_timm is not None for r in rows)
    extra = (" vs timm eager |", "---:|") if with_timm else ("", "")
    lines = [
        "| mode | path | img/s | ms/batch | speed-up vs eager fp32 NCHW |" + extra[0],
        "|---|---|---:|---:|---:|" + extra[1],
    ]
    for r in rows:
        vs_timm = (f" {r.vs_timm:.2f}x |" if r.vs_timm is not None else " - |") if with_timm else ""
        lines.append(f"| {r.mode} | {r.path} | {r.img_per_s:.1f} | {r.ms_per_batch:.1f} | {r.speedup:.2f}x |{vs_timm}")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
        torch.backends.cudnn.benchmark = True
    elif args.precision == "fp16":
        raise ValueError("--precision fp16 is for GPUs; on the CPU use bf16 (or fp32)")
    args.precision = resolve_precision(args.precision, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    builders = {"inference": inference_paths, "train": train_paths}
    rows: list[Row] = []
    for mode in args.modes:
        paths = builders[mode](model, args, device)
        if mode == "train" and "timm" in args.backends:
            paths.update(peer_train_path(model, args, device))
        rows += to_rows(mode, measure(paths, args, device), args.batch_size)
    return {"args": vars(args), "environment": environment(args, device), "rows": [asdict(r) for r in rows]}


def print_census(args: argparse.Namespace) -> int:
    """The census table per preset and batch size (see --census)."""
    from res2net.engine.census import census_table, preset_census, training_presets

    presets = args.presets or training_presets()
    unknown = sorted(set(presets) - set(training_presets()))
    if unknown:
        print(
            f"benchmark.py: error: --presets {unknown}: not training presets; use {training_presets()}", file=sys.stderr
        )
        return 2
    rows = [preset_census(p, b, img_size=args.census_img_size) for p in presets for b in args.census_batch]
    print(
        f"op census of one steady-state training step (CPU, reduced model, {args.census_img_size} px); ops are "
        "aten ops (about one GPU kernel each), host reads would each stop the host on a GPU"
    )
    print(census_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.census:
        return print_census(args)
    if not args.keep_allocator:
        ensure_allocator_env(argv)
    try:
        report = run_benchmark(args)
    except (ValueError, RuntimeError) as err:
        print(f"benchmark.py: error: {err}", file=sys.stderr)
        return 2
    a = args
    env = report["environment"]
    print(
        f"{a.model}, batch {a.batch_size}, {a.img_size} px, {a.device} ({env['cpu_capability']}), {a.precision}, "
        f"{env['torch_threads']} threads, median of {a.rounds} rounds x {a.iters} iterations"
    )
    print(markdown_table([Row(**r) for r in report["rows"]]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
