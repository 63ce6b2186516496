"""Throughput and memory of `generic_labels` or the offset loss, per impl, shape and token count (`obliviate profile-kernel`).

    obliviate profile-kernel --shape llama2-7b --tokens 512 --impl reference,chunked          # CPU
    obliviate profile-kernel --shape llama2-7b --shape llama3-8b --tokens 8192,65536 --dtype bf16
    obliviate profile-kernel --op offset --shape llama2-7b --small-hidden 1024 --tokens 8192 --dtype bf16
    python -m kernels.profile --shape llama2-7b --tokens 8192 --dtype bf16   # same flags, without the CLI's deps

--op labels (default) times `generic_labels`; --op offset times `offset_token_stats` forward + backward
(log p and KL to M, gradients for the trainable pair), M of the --shape and a small pair of --small-hidden
width (default H/4) on the same vocabulary, α from --alphas (one value, default 1).
Per row: median ms (`triton.testing.do_bench` on CUDA, wall clock over --repeats on CPU), tokens/s,
effective TFLOP/s and % of the device's dense peak (FLOPs: 4·N·H·V for labels, two matmuls; 2·N·V·(H + 4·H_o)
for offset, three forward matmuls and two gradient ones, the backward's recomputation not counted), peak
extra memory beyond the inputs, and the fraction that agrees with `reference` on the same inputs (labels:
by id, or by the mixed value at the chosen id within a tolerance, so ties do not count as errors; offset:
rows whose log p and KL are within 1e-3·max(1, |reference|)). Rows that would not fit are estimated first
and skipped, allocation failures become "OOM", and a name that is not registered in `kernels.mixing`
becomes "unavailable"; nothing here stops the sweep.
Rows are appended to a CSV and drawn in a PNG. Needs only torch at import time (triton, matplotlib lazily).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import importlib.metadata
import importlib.util
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from kernels.device import LLAMAS, extra_bytes_estimate, nvtx_range, offset_extra_bytes_estimate, peak_tflops
from kernels.mixing import IMPL_NAMES, interpreter_requested

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA_HEADROOM = 512 << 20  # do_bench's 256 MiB L2-flush buffer, the CUDA context's slack
GIB, MIB = float(1 << 30), float(1 << 20)
CSV_COLUMNS = ("timestamp", "device", "torch", "triton", "commit", "impl", "shape", "H", "V", "N", "dtype", "alphas",
               "ms", "tokens/s", "TFLOP/s", "% peak", "peak extra MiB", "memory measure", "status", "match fraction",
               "op", "H small")  # the last two joined later: older files lack them (op labels, no small pair)


class BadFlag(ValueError):
    """A flag value the profiler cannot use: `main` prints it as one line and exits 2, before anything runs."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's text (its type name when it has none), for one-line row statuses."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


@dataclass
class Row:
    impl: str
    shape: str
    H: int
    V: int
    N: int
    dtype: str
    ms: float | None = None
    extra_bytes: int | None = None
    status: str = "ok"
    match: float | None = None
    op: str = "labels"
    H_small: int | None = None  # the offset op's small pair

    @property
    def flops(self) -> int:
        if self.op == "offset":  # z_M, z_O, z_P forward; dh_P, dW_P backward (recomputed logits not counted)
            return 2 * self.N * self.V * (self.H + 4 * self.H_small)
        return 4 * self.N * self.H * self.V

    @property
    def tokens_per_s(self) -> float | None:
        return self.N / (self.ms / 1e3) if self.ms else None

    @property
    def tflops(self) -> float | None:
        return self.flops / (self.ms / 1e3) / 1e12 if self.ms else None

    def pct_peak(self, peak: float | None) -> float | None:
        return 100.0 * self.tflops / peak if self.tflops is not None and peak else None


# ---------------------------------------------------------------- options

def parse_shape(text: str) -> tuple[str, int, int]:
    text = text.strip()
    if text.lower() in LLAMAS:
        dims = LLAMAS[text.lower()]
        return (text.lower(), dims.hidden, dims.vocab)
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        h, v = int(parts[0]), int(parts[1])
        return (f"{h}x{v}", h, v)
    raise BadFlag(f"--shape {text!r}: give one of {', '.join(LLAMAS)} or H,V (two positive integers)")


def parse_tokens(values) -> list[int]:
    tokens = []
    for value in values:
        for part in str(value).split(","):
            try:
                n = int(part)
            except ValueError:
                raise BadFlag(f"--tokens {value!r}: give positive integers (repeat --tokens or comma-separate)") from None
            if n <= 0:
                raise BadFlag(f"--tokens {value!r}: token counts must be positive, got {n}")
            tokens.append(n)
    if not tokens:
        raise BadFlag("give at least one --tokens N")
    return list(dict.fromkeys(tokens))


def _number(flag: str, text, kind=float, minimum: float = 0.0, strict: bool = True):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise BadFlag(f"{flag} {text!r}: not a {'whole ' if kind is int else ''}number") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise BadFlag(f"{flag} {text!r}: must be {'>' if strict else '≥'} {minimum:g}")
    return value


def _check_output(flag: str, path: str | None) -> None:
    """An output file the sweep will write at its end: refused now, not after minutes of timing."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise BadFlag(f"{flag} {path}: is a directory, give a file name")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadFlag(f"{flag} {path}: {ancestor} is a file, not a directory")


def registered_impls() -> list[str]:
    """The names `kernels.mixing.generic_labels` accepts (a function, so tests can register fakes)."""
    return list(IMPL_NAMES)


def parse_impls(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = ["auto", *IMPL_NAMES, *(name for name in registered_impls() if name not in IMPL_NAMES)]
    for name in names:
        if name not in known:
            raise BadFlag(f"--impl {name!r}: unknown implementation; choose from {', '.join(known)}")
    if not names:
        raise BadFlag("--impl: give at least one implementation")
    return list(dict.fromkeys(names))


def pick_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise BadFlag(f"--device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadFlag("--device cuda was asked for but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# ---------------------------------------------------------------- the machine

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return f"{model or 'CPU'} ({torch.get_num_threads()} threads)"


def versions() -> tuple[str, str]:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return torch.__version__, triton


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can take now: CUDA free memory, or the kernel's MemAvailable on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    with contextlib.suppress(ImportError):
        import psutil

        return psutil.virtual_memory().available
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class MemoryMeter:
    """Peak memory a call adds beyond what is allocated before it (the inputs).

    CUDA: `max_memory_allocated` after `reset_peak_memory_stats`. CPU: tracemalloc does not see torch's
    allocations, so the process's resident-set high-water mark (Linux VmHWM, reset through
    /proc/self/clear_refs) minus the resident set before the call, after returning freed heap to the OS;
    where VmHWM cannot be reset, the `getrusage` ru_maxrss delta, which misses peaks below an earlier one.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_hwm = device.type == "cpu" and self._reset_hwm()
        self.method = ("CUDA max allocated" if device.type == "cuda"
                       else "RSS high-water delta" if self.cpu_hwm else "ru_maxrss delta (lower bound)")
        self.extra = 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return MemoryMeter._status("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int | None:
        with contextlib.suppress(OSError):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages would otherwise hide reuse
        if self.cpu_hwm:
            self._reset_hwm()
            self.base = self._status("VmRSS")
        else:
            self.base = self.before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.cpu_hwm:
            self.extra = self._status("VmHWM") - self.base
        else:
            self.extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.before_max
        self.extra = max(0, self.extra)
        return False


# ---------------------------------------------------------------- estimates and inputs

def input_bytes(n: int, h: int, v: int, dtype: torch.dtype, k: int) -> int:
    return 2 * (n + v) * h * dtype.itemsize + n * k * 8


def _normal(g: torch.Generator, rows: int, width: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(rows, width, dtype=dtype, device=g.device).normal_(0.0, std, generator=g)


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, k: int, device: torch.device, seed: int = 0):
    """hb, wb, hr, wr, forbidden: hidden states ~ N(0, 1), weights ~ N(0, 1/H) so logits are ~ N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hb, wb, hr, wr = (_normal(g, rows, h, std, dtype) for rows, std in ((n, 1.0), (v, h**-0.5), (n, 1.0), (v, h**-0.5)))
    forbidden = None
    if k:
        forbidden = torch.randint(0, v, (n, k), generator=g, device=device)
        if k > 1:
            forbidden[1::2, -1] = -1  # padding on every other row
    return hb, wb, hr, wr, forbidden


def make_offset_inputs(n: int, h: int, h_small: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """h_big, w_big, h_small, w_small, h_train, w_train (trainable: P = O plus a little noise), targets."""
    g = torch.Generator(device=device).manual_seed(seed)
    h_big, w_big = _normal(g, n, h, 1.0, dtype), _normal(g, v, h, h**-0.5, dtype)
    hidden, weight = _normal(g, n, h_small, 1.0, dtype), _normal(g, v, h_small, h_small**-0.5, dtype)
    h_train = (hidden + _normal(g, n, h_small, 0.1, dtype)).requires_grad_()
    w_train = (weight + _normal(g, v, h_small, 0.1 * h_small**-0.5, dtype)).requires_grad_()
    return h_big, w_big, hidden, weight, h_train, w_train, torch.randint(0, v, (n,), generator=g, device=device)


@dataclass
class LabelsOp:
    """`generic_labels` with the run's α list and K forbidden ids per row."""

    alphas: list[float]
    forbidden_k: int
    name = "labels"
    title = "generic_labels"
    flops_text = "4·N·H·V"

    def small(self, h: int) -> None:
        return None

    def input_bytes(self, n, h, v, dtype) -> int:
        return input_bytes(n, h, v, dtype, self.forbidden_k)

    def extra_bytes(self, impl, n, h, v, dtype) -> int:
        return extra_bytes_estimate(impl, n, h, v, dtype, len(self.alphas), self.forbidden_k)

    def make_inputs(self, n, h, v, dtype, device):
        return make_inputs(n, h, v, dtype, self.forbidden_k, device)

    def call(self, inputs, impl: str):
        import kernels.mixing  # looked up per call, so tests can put a fake dispatcher there

        return kernels.mixing.generic_labels(*inputs[:4], self.alphas, inputs[4], impl=impl)

    def reference(self, inputs):
        import kernels.mixing

        labels, _, best = kernels.mixing.generic_labels(*inputs[:4], self.alphas, inputs[4], impl="reference", return_stats=True)
        return labels, best

    def problem(self, result) -> str | None:
        return None if isinstance(result, torch.Tensor) else f"error: returned {type(result).__name__}, not a label tensor"

    def match(self, result, reference, inputs) -> float:
        return match_fraction(result, reference[0], reference[1], inputs, self.alphas)


@dataclass
class OffsetOp:
    """`offset_token_stats` forward + backward with the KL (the retain loss, the larger case), M of the shape's
    width and a small pair of `small_hidden` (default H/4) on the same vocabulary."""

    alpha: float
    small_hidden: int | None
    name = "offset"
    title = "offset_token_stats forward + backward"
    flops_text = "2·N·V·(H + 4·H_o)"

    def small(self, h: int) -> int:
        return self.small_hidden or max(1, h // 4)

    def input_bytes(self, n, h, v, dtype) -> int:
        return (n + v) * (h + 2 * self.small(h)) * dtype.itemsize + 8 * n

    def extra_bytes(self, impl, n, h, v, dtype) -> int:
        return offset_extra_bytes_estimate(impl, n, h, self.small(h), v, dtype)

    def make_inputs(self, n, h, v, dtype, device):
        return make_offset_inputs(n, h, self.small(h), v, dtype, device)

    def call(self, inputs, impl: str):
        """(log_probs, kl, dh_train, dw_train); the gradients are returned, not accumulated into .grad."""
        from kernels.offset import offset_token_stats

        *heads, targets = inputs
        log_probs, kl = offset_token_stats(*heads, targets, self.alpha, kl=True, impl=impl)
        grads = torch.autograd.grad(log_probs.sum() + kl.sum(), heads[4:])
        return (log_probs.detach(), kl.detach(), *grads)

    def reference(self, inputs):
        return self.call(inputs, "reference")

    def problem(self, result) -> str | None:
        return None if isinstance(result, tuple) and len(result) == 4 else "error: not (log_probs, kl, dh, dw)"

    def match(self, result, reference, inputs) -> float:
        close = [((got - want).abs() <= 1e-3 * want.abs().clamp(min=1.0)) for got, want in zip(result[:2], reference[:2])]
        return float((close[0] & close[1]).float().mean())


# ---------------------------------------------------------------- measuring

def is_oom(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                                 or "defaultcpuallocator" in text)


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn(): triton's do_bench on CUDA (CUDA events when triton is absent), wall clock on CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            try:
                return float(do_bench(fn, return_mode="median"))
            except TypeError:  # older triton: no return_mode
                return float(do_bench(fn, quantiles=[0.5]))
        times = []
        for _ in range(max(repeats, 10)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def match_fraction(labels, ref_labels, ref_best, inputs, alphas, block: int = 1024) -> float:
    """Share of (row, α) whose label is the reference's id, or whose mixed value equals the reference's max.

    The mixed value at the chosen id is recomputed in fp32 from gathered weight rows (no [N, V] logits);
    tolerance 1e-4·(1 + 2α)·max(1, |max|) covers summation order. Ids outside [0, V) count as wrong.
    """
    hb, wb, hr, wr, forbidden = inputs
    n, v = hb.shape[0], wb.shape[0]
    if tuple(labels.shape) != tuple(ref_labels.shape):
        return 0.0
    labels = labels.to(ref_labels.device).long()
    alpha = torch.tensor(alphas, dtype=torch.float32, device=hb.device)
    row_mean_weight = None
    if forbidden is not None:
        row_mean_weight = sum(wb[i:i + 8192].float().sum(0) for i in range(0, v, 8192)) / v
    good = 0
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        ids, ref_ids, best = labels[rows], ref_labels[rows], ref_best[rows]
        valid = (ids >= 0) & (ids < v)
        safe = ids.clamp(0, v - 1)
        b = torch.einsum("nh,nah->na", hb[rows].float(), wb[safe].float())
        r = torch.einsum("nh,nah->na", hr[rows].float(), wr[safe].float())
        if forbidden is not None:
            hit = (safe.unsqueeze(-1) == forbidden[rows].unsqueeze(1)).any(-1)
            b = torch.where(hit, (hb[rows].float() @ row_mean_weight).unsqueeze(1).expand_as(b), b)
        mixed = b - alpha * torch.relu(r - b)
        tol = 1e-4 * (1 + 2 * alpha) * best.abs().clamp(min=1.0)
        good += int((valid & ((ids == ref_ids) | (mixed >= best - tol))).sum())
    return good / max(1, labels.numel())


def profile(shapes, tokens, dtype_name, impls, op, device, repeats, log=None) -> list[Row]:
    """One Row per impl × shape × N for `op` (LabelsOp or OffsetOp); inputs are built once per shape × N and
    shared by every impl."""
    registered = registered_impls()
    log = log or (lambda message: None)
    dtype = DTYPES[dtype_name]
    headroom = CUDA_HEADROOM if device.type == "cuda" else 0
    rows = []
    for shape, h, v in shapes:
        for n in tokens:
            free = free_bytes(device)
            inputs_size = op.input_bytes(n, h, v, dtype)
            needed = {impl: inputs_size + headroom + op.extra_bytes(impl, n, h, v, dtype) for impl in {*impls, "reference"}}

            planned = []
            for impl in impls:
                row = Row(impl, shape, h, v, n, dtype_name, op=op.name, H_small=op.small(h))
                if impl != "auto" and impl not in registered:
                    row.status = "unavailable: not registered in kernels.mixing"
                elif impl == "triton" and device.type == "cpu" and not interpreter_requested():
                    row.status = "unavailable: triton needs CUDA or TRITON_INTERPRET=1"
                elif impl == "triton" and importlib.util.find_spec("triton") is None:
                    row.status = "unavailable: triton is not installed"
                elif needed[impl] > free:
                    row.status = f"skipped: needs {needed[impl] / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
                else:
                    planned.append(row)
                rows.append(row)
            if not planned:
                continue
            try:
                inputs = op.make_inputs(n, h, v, dtype, device)
            except Exception as error:  # noqa: BLE001 - an allocation failure ends this shape, not the sweep
                if not is_oom(error):
                    raise
                for row in planned:
                    row.status = "OOM (building inputs)"
                continue
            reference = None
            if needed["reference"] <= free:
                log(f"  reference {op.name} for {shape} N={n} (correctness)")
                try:
                    reference = op.reference(inputs)
                except Exception as error:  # noqa: BLE001
                    if not is_oom(error):
                        raise
            for row in planned:
                log(f"  {row.impl} {shape} N={n} {dtype_name}")
                _measure(row, op, inputs, device, repeats, reference)
            del inputs, reference
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _measure(row: Row, op, inputs, device, repeats, reference) -> None:
    def call():
        with nvtx_range(f"{op.title.split()[0]}[{row.impl}]"):
            return op.call(inputs, row.impl)

    try:
        call()  # warm-up: compilation and autotuning (whose benchmark buffers) stay out of the memory figure
        with MemoryMeter(device) as meter:
            result = call()
        row.extra_bytes = meter.extra
        row.ms = time_ms(call, device, repeats)
    except Exception as error:  # noqa: BLE001 - one failing impl is a row, not the end of the sweep
        row.ms = row.extra_bytes = None
        if is_oom(error):
            row.status = "OOM"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            message = first_line(error)[:120]
            row.status = f"error: {type(error).__name__}: {message}"
        return
    problem = op.problem(result)
    if problem:
        row.status = problem
    elif reference is not None:
        row.match = op.match(result, reference, inputs)


# ---------------------------------------------------------------- output

def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[Row], peak: float | None, memory_method: str) -> str:
    header = ["impl", "shape", "H", "V", "N", "dtype", "ms", "tokens/s", "TFLOP/s", "% peak",
              f"extra MiB ({memory_method})", "match", "status"]
    lines = [[r.impl, r.shape, str(r.H), str(r.V), str(r.N), r.dtype, _fmt(r.ms, ".3f", "-"),
              _fmt(r.tokens_per_s, ",.0f", "-"), _fmt(r.tflops, ".3f", "-"),
              _fmt(r.pct_peak(peak), ".1f", "-" if r.ms is None else "n/a"),
              _fmt(None if r.extra_bytes is None else r.extra_bytes / MIB, ",.1f", "-"),
              _fmt(r.match, ".4f", "-" if r.ms is None else "n/a"), r.status] for r in rows]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    left = {0, 1, 5, 12}

    def render(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def append_csv(path: Path, rows: list[Row], meta: dict, peak: float | None, alphas, memory_method: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([meta["timestamp"], meta["device"], meta["torch"], meta["triton"], meta["commit"],
                             r.impl, r.shape, r.H, r.V, r.N, r.dtype, ",".join(f"{a:g}" for a in alphas),
                             _fmt(r.ms, ".4f"), _fmt(r.tokens_per_s, ".1f"), _fmt(r.tflops, ".4f"),
                             _fmt(r.pct_peak(peak), ".2f"),
                             _fmt(None if r.extra_bytes is None else r.extra_bytes / MIB, ".2f"),
                             memory_method if r.extra_bytes is not None else "", r.status, _fmt(r.match, ".6f"),
                             r.op, _fmt(r.H_small, "d")])


def plot(path: Path, rows: list[Row], title: str, memory_method: str, flops_text: str = "4·N·H·V") -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    speed, memory = fig.subplots(1, 2)
    series: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.ms is not None:
            series.setdefault((r.impl, r.shape), []).append(r)
    for (impl, shape), points in series.items():
        points.sort(key=lambda r: r.N)
        xs = [r.N for r in points]
        speed.plot(xs, [r.tflops for r in points], marker="o", label=f"{impl} · {shape}")
        memory.plot(xs, [r.extra_bytes / MIB for r in points], marker="o", label=f"{impl} · {shape}")
    for ax, ylabel in ((speed, f"effective TFLOP/s ({flops_text})"), (memory, f"peak extra MiB ({memory_method})")):
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if series:
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no row ran", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def profile_kernel(shapes, tokens, dtype: str | None = None, impls: str = "reference,chunked,triton",
                   alphas: str | None = None, forbidden="0", peak=None, csv_path="runs/profile/kernel.csv",
                   plot_path="runs/profile/kernel.png", repeats="3", device: str = "auto", echo=print,
                   log=None, op: str = "labels", small_hidden=None) -> list[Row]:
    """The whole command from its raw option values; bad input raises BadFlag before anything runs."""
    if op not in ("labels", "offset"):
        raise BadFlag(f"--op {op!r}: choose labels or offset")
    parsed_shapes = [parse_shape(s) for s in shapes]
    if not parsed_shapes:
        raise BadFlag("give at least one --shape (" + ", ".join(LLAMAS) + ", or H,V)")
    parsed_tokens = parse_tokens(tokens)
    parsed_device = pick_device(device)
    dtype = dtype or ("bf16" if parsed_device.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise BadFlag(f"--dtype {dtype!r}: choose {', '.join(DTYPES)}")
    parsed_impls = parse_impls(impls)
    alphas = alphas or ("2.5,5,10" if op == "labels" else "1")
    parsed_alphas = [_number("--alphas", a) for a in str(alphas).split(",") if a.strip()]
    if not parsed_alphas:
        raise BadFlag("--alphas: give at least one positive number")
    forbidden_k = _number("--forbidden", forbidden, int, strict=False)
    if op == "labels":
        if small_hidden is not None:
            raise BadFlag("--small-hidden: only --op offset has a small pair")
        kernel_op = LabelsOp(parsed_alphas, forbidden_k)
    else:
        if len(parsed_alphas) != 1 or forbidden_k:
            raise BadFlag("--op offset takes one --alphas value (the ensemble's α) and no --forbidden")
        small = None if small_hidden is None else _number("--small-hidden", small_hidden, int)
        kernel_op = OffsetOp(parsed_alphas[0], small)
    peak_override = None if peak in (None, "") else _number("--peak-tflops", peak)
    repeat_count = _number("--repeats", repeats, int)
    for flag, path in (("--csv", csv_path), ("--plot", plot_path)):
        _check_output(flag, path)

    name = device_name(parsed_device)
    peak_value = peak_tflops(parsed_device, dtype, peak_override)
    memory_method = MemoryMeter(parsed_device).method
    torch_version, triton_version = versions()
    meta = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": name,
            "torch": torch_version, "triton": triton_version, "commit": git_commit()}
    rows = profile(parsed_shapes, parsed_tokens, dtype, parsed_impls, kernel_op, parsed_device, repeat_count, log=log)

    peak_text = "unknown"
    if peak_value:
        peak_text = f"{peak_value:g} TFLOP/s" + (" (--peak-tflops)" if peak_override else "")
    echo(f"{name} · torch {torch_version} · triton {triton_version} · commit {meta['commit']} · {dtype} · "
         f"{op} · alphas {','.join(f'{a:g}' for a in parsed_alphas)} · "
         + (f"forbidden K={forbidden_k}" if op == "labels" else "small pair H_o=" + ",".join(
             dict.fromkeys(str(kernel_op.small(h)) for _, h, _ in parsed_shapes)))
         + f" · peak {peak_text}")
    echo(table(rows, peak_value, memory_method))
    csv_file = Path(csv_path).expanduser()
    append_csv(csv_file, rows, meta, peak_value, parsed_alphas, memory_method)
    written = [f"{len(rows)} rows appended to {csv_file}"]
    if plot_path:
        try:
            plot(Path(plot_path).expanduser(), rows, f"{kernel_op.title} on {name}, {dtype}", memory_method,
                 kernel_op.flops_text)
            written.append(f"plot {plot_path}")
        except ImportError:
            written.append("no plot (matplotlib is not installed)")
    echo("; ".join(written))
    return rows


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        """Bad flags end in one line, like every other bad input (`--help` shows the usage)."""
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")


def _glued(argv: list[str]) -> list[str]:
    """`--alphas -1,nan` as `--alphas=-1,nan`: every flag takes a value, and one starting with "-" would
    otherwise be read as a flag of its own."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and "=" not in argv[i] and argv[i] not in ("--help", "-h") and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None, prog: str = "python -m kernels.profile") -> None:
    """The command line of `obliviate profile-kernel` and `python -m kernels.profile` (only torch + triton needed)."""
    parser = _OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=[], help=f"{', '.join(LLAMAS)}, or H,V; repeatable")
    parser.add_argument("--tokens", action="append", default=[], help="token counts N; repeat or comma-separate (1024,8192)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--impl", default="reference,chunked,triton", help="comma-separated implementations (default: %(default)s)")
    parser.add_argument("--op", default="labels", help="labels (generic_labels) or offset (offset_token_stats "
                        "forward + backward) (default: %(default)s)")
    parser.add_argument("--alphas", default=None, help="comma-separated α; --op offset: one, the ensemble's "
                        "(default: 2.5,5,10 for labels, 1 for offset)")
    parser.add_argument("--small-hidden", default=None, help="--op offset: hidden width H_o of the small pair "
                        "(default: H/4 of each --shape)")
    parser.add_argument("--forbidden", default="0", help="forbidden ids per row, K (default: %(default)s)")
    parser.add_argument("--peak-tflops", default=None, help="dense peak of the device, overriding the built-in table")
    parser.add_argument("--csv", default="runs/profile/kernel.csv", help="CSV to append rows to (default: %(default)s)")
    parser.add_argument("--plot", default="runs/profile/kernel.png", help="PNG plot to write (default: %(default)s)")
    parser.add_argument("--repeats", default="3", help="timed calls per row on CPU; CUDA uses do_bench (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    a = parser.parse_args(_glued(list(sys.argv[1:] if argv is None else argv)))
    try:
        profile_kernel(a.shape, a.tokens, a.dtype, a.impl, a.alphas, a.forbidden, a.peak_tflops, a.csv, a.plot,
                       a.repeats, a.device, log=lambda m: print(m, file=sys.stderr, flush=True), op=a.op,
                       small_hidden=a.small_hidden)
    except BadFlag as e:
        print(f"{prog.split()[0]}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
