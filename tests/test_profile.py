"""`obliviate profile-kernel` on CPU: the table, the CSV appended across runs, the plot, the arithmetic,
rows that cannot fit or fail, and bad input (one line, exit 2). Tiny shapes: the whole file runs in seconds.
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.device
import kernels.mixing
import kernels.profile as prof
from kernels.mixing import interpreter_requested
from builders import obliviate

REPO = Path(__file__).resolve().parents[1]


def impls_here() -> list[str]:
    """reference plus whatever is registered now; triton only where its interpreter can run it."""
    names = ["reference", *(name for name in prof.registered_impls() if name != "reference")]
    return [name for name in names if name != "triton" or interpreter_requested()]


def tiny(tmp_path, *extra, impls=None):
    return ["profile-kernel", "--shape", "64,300", "--tokens", "16", "--tokens", "33", "--impl", ",".join(impls or impls_here()),
            "--repeats", "2", "--csv", tmp_path / "kernel.csv", "--plot", tmp_path / "kernel.png", *extra]


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_tiny_run_prints_table_appends_csv_and_draws_png(tmp_path, capsys):
    impls = impls_here()
    code, out, err = obliviate(*tiny(tmp_path), capsys=capsys)
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("impl"))
    for column in ("ms", "tokens/s", "TFLOP/s", "% peak", "extra MiB (RSS high-water delta)", "match", "status"):
        assert column in header
    body = [line.split() for line in lines if line.split()[:2] in ([name, "64x300"] for name in impls)]
    assert len(body) == 2 * len(impls)
    assert {row[4] for row in body} == {"16", "33"}
    ref = [row for row in body if row[0] == "reference"]
    assert all(row[-1] == "ok" and row[-2] == "1.0000" and row[9] == "n/a" for row in ref), ref  # no CPU peak

    rows = read_csv(tmp_path / "kernel.csv")
    assert tuple(rows[0]) == prof.CSV_COLUMNS and len(rows) == 1 + 2 * len(impls)
    record = dict(zip(rows[0], rows[1]))
    assert record["device"] and record["torch"] == torch.__version__ and record["commit"]
    assert (record["impl"], record["H"], record["V"], record["N"], record["dtype"], record["alphas"]) == ("reference", "64", "300", "16", "fp32", "2.5,5,10")
    assert record["status"] == "ok" and float(record["match fraction"]) == 1.0 and float(record["peak extra MiB"]) >= 0
    # the CSV's own numbers obey FLOPs = 4·N·H·V
    seconds = float(record["ms"]) / 1e3
    assert float(record["TFLOP/s"]) == pytest.approx(4 * 16 * 64 * 300 / seconds / 1e12, rel=1e-2, abs=1e-4)
    assert float(record["tokens/s"]) == pytest.approx(16 / seconds, rel=1e-3)
    for row in rows[1:]:
        record = dict(zip(rows[0], row))
        if record["status"] == "ok":
            assert 0.0 <= float(record["match fraction"]) <= 1.0, record

    png = (tmp_path / "kernel.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    code, _, err = obliviate(*tiny(tmp_path, "--dtype", "bf16", "--forbidden", "3"), capsys=capsys)
    assert code == 0, err
    again = read_csv(tmp_path / "kernel.csv")
    assert len(again) == 1 + 4 * len(impls) and again[: len(rows)] == rows  # appended, header once
    assert sum(row == list(prof.CSV_COLUMNS) for row in again) == 1
    bf16 = [dict(zip(again[0], row)) for row in again[len(rows):] if row[5] == "reference"]
    assert all(r["dtype"] == "bf16" and float(r["match fraction"]) == 1.0 for r in bf16)


def test_offset_op_times_forward_and_backward_beside_the_reference(tmp_path, capsys):
    impls = impls_here()
    code, out, err = obliviate(*tiny(tmp_path, "--op", "offset", "--small-hidden", "8", "--alphas", "1.5"), capsys=capsys)
    assert code == 0, err
    assert "offset · alphas 1.5 · small pair H_o=8" in out
    rows = [dict(zip(prof.CSV_COLUMNS, row)) for row in read_csv(tmp_path / "kernel.csv")[1:]]
    assert len(rows) == 2 * len(impls) and {r["op"] for r in rows} == {"offset"} and {r["H small"] for r in rows} == {"8"}
    assert all(r["status"] == "ok" and float(r["match fraction"]) == 1.0 and r["alphas"] == "1.5" for r in rows), rows
    record = rows[0]  # FLOPs = 2·N·V·(H + 4·H_o): three forward matmuls, two gradient ones
    assert float(record["TFLOP/s"]) == pytest.approx(2 * 16 * 300 * (64 + 4 * 8) / (float(record["ms"]) / 1e3) / 1e12, rel=1e-2, abs=1e-4)
    png = (tmp_path / "kernel.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    code, out, err = obliviate(*tiny(tmp_path, "--op", "offset", impls=["chunked"]), capsys=capsys)
    assert code == 0, err
    assert "small pair H_o=16" in out  # H/4 by default


def test_flop_arithmetic_on_a_known_case():
    row = prof.Row("x", "llama2-7b", 4096, 32000, 1024, "bf16", ms=10.0)
    assert row.flops == 4 * 1024 * 4096 * 32000 == 536_870_912_000
    assert row.tflops == pytest.approx(53.6870912)
    assert row.tokens_per_s == pytest.approx(102_400)
    assert row.pct_peak(989.0) == pytest.approx(100 * 53.6870912 / 989.0)
    assert row.pct_peak(None) is None and prof.Row("x", "s", 1, 1, 1, "fp32").tflops is None
    offset = prof.Row("x", "llama2-7b", 4096, 32000, 1024, "bf16", ms=10.0, op="offset", H_small=1024)
    assert offset.flops == 2 * 1024 * 32000 * (4096 + 4 * 1024)


def test_shape_that_cannot_fit_is_skipped_without_allocating(tmp_path, capsys, monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("inputs were built for a shape that cannot fit")

    monkeypatch.setattr(prof, "make_inputs", no_allocation)
    argv = ["profile-kernel", "--shape", "100000,1000000", "--tokens", "1000000", "--impl", ",".join(impls_here()),
            "--dtype", "bf16", "--csv", tmp_path / "k.csv", "--plot", tmp_path / "k.png"]
    code, out, err = obliviate(*argv, capsys=capsys)
    assert code == 0, err
    statuses = [dict(zip(read_csv(tmp_path / "k.csv")[0], row))["status"] for row in read_csv(tmp_path / "k.csv")[1:]]
    assert statuses and all(s.startswith("skipped: needs ") and s.endswith(" GiB free") for s in statuses), statuses
    assert "skipped: needs" in out
    assert (tmp_path / "k.png").read_bytes().startswith(b"\x89PNG")


def test_wrong_failing_and_unregistered_impls_become_rows(tmp_path, capsys, monkeypatch):
    real = kernels.mixing.generic_labels

    def dispatch(hb, wb, hr, wr, alphas, forbidden=None, *, impl="auto", return_stats=False):
        if impl == "wrong":  # always the last id
            return torch.full((hb.shape[0], len(alphas)), wb.shape[0] - 1, dtype=torch.long)
        if impl == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        if impl == "broken":
            raise ValueError("no kernel for this\nsecond line")
        return real(hb, wb, hr, wr, alphas, forbidden, impl=impl, return_stats=return_stats)

    monkeypatch.setattr(kernels.mixing, "generic_labels", dispatch)
    monkeypatch.setattr(prof, "registered_impls", lambda: ["reference", "wrong", "oom", "broken"])  # no chunked
    code, out, err = obliviate(*tiny(tmp_path, impls=["reference", "wrong", "oom", "broken", "chunked"]), capsys=capsys)
    assert code == 0, err
    rows = [dict(zip(prof.CSV_COLUMNS, row)) for row in read_csv(tmp_path / "kernel.csv")[1:]]
    by_impl = {r["impl"]: r for r in rows if r["N"] == "33"}
    assert float(by_impl["wrong"]["match fraction"]) < 0.5 and by_impl["wrong"]["status"] == "ok"
    assert by_impl["oom"]["status"] == "OOM" and by_impl["oom"]["ms"] == ""
    assert by_impl["broken"]["status"] == "error: ValueError: no kernel for this"
    assert by_impl["chunked"]["status"].startswith("unavailable")
    assert float(by_impl["reference"]["match fraction"]) == 1.0


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--shape", "llama9-1b", "--tokens", "16"], "--shape 'llama9-1b'"),
        (["--shape", "64,x", "--tokens", "16"], "H,V"),
        (["--shape", "0,300", "--tokens", "16"], "H,V"),
        (["--shape", "64,300,7", "--tokens", "16"], "H,V"),
        (["--shape", "64,300", "--tokens", "0"], "positive"),
        (["--shape", "64,300", "--tokens", "16,-4"], "positive"),
        (["--shape", "64,300", "--tokens", "many"], "--tokens 'many'"),
        (["--shape", "64,300"], "--tokens"),
        (["--tokens", "16"], "--shape"),
        (["--shape", "64,300", "--tokens", "16", "--dtype", "fp8"], "--dtype 'fp8'"),
        (["--shape", "64,300", "--tokens", "16", "--impl", "reference,magic"], "--impl 'magic'"),
        (["--shape", "64,300", "--tokens", "16", "--device", "tpu"], "--device 'tpu'"),
        (["--shape", "64,300", "--tokens", "16", "--alphas", "5,-1"], "--alphas"),
        (["--shape", "64,300", "--tokens", "16", "--repeats", "0"], "--repeats"),
        (["--shape", "64,300", "--tokens", "16", "--forbidden", "two"], "--forbidden"),
        (["--shape", "64,300", "--tokens", "16", "--peak-tflops", "-3"], "--peak-tflops"),
        (["--shape", "64,300", "--tokens", "16", "--op", "loss"], "--op 'loss'"),
        (["--shape", "64,300", "--tokens", "16", "--small-hidden", "8"], "--small-hidden"),
        (["--shape", "64,300", "--tokens", "16", "--op", "offset", "--small-hidden", "0"], "--small-hidden"),
        (["--shape", "64,300", "--tokens", "16", "--op", "offset", "--alphas", "1,2"], "one --alphas"),
        (["--shape", "64,300", "--tokens", "16", "--op", "offset", "--forbidden", "2"], "no --forbidden"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, tmp_path, capsys):
    code, out, err = obliviate("profile-kernel", *argv, "--csv", tmp_path / "k.csv", "--plot", tmp_path / "k.png", capsys=capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("obliviate: error:") and fragment in lines[0], err
    assert not (tmp_path / "k.csv").exists() and not (tmp_path / "k.png").exists()


def test_peak_table_override_and_nvtx_noop(monkeypatch):
    cuda = torch.device("cuda")
    for name, dtype, peak in [("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0),
                              ("NVIDIA H200", "fp16", 989.0), ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
                              ("NVIDIA GeForce RTX 4090", "bf16", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert kernels.device.peak_tflops(cuda, dtype, None) == peak, name
    assert kernels.device.peak_tflops(cuda, "bf16", 500.0) == 500.0
    assert kernels.device.peak_tflops(torch.device("cpu"), "bf16", None) is None
    assert kernels.device.peak_tflops(torch.device("cpu"), "bf16", 1.5) == 1.5
    with kernels.device.nvtx_range("generic_labels"):
        pass


def test_estimates_grow_with_the_materialized_logits():
    est = kernels.device.extra_bytes_estimate
    reference = est("reference", 8192, 4096, 128256, torch.bfloat16, 3, 0)
    assert reference >= 2 * 8192 * 128256 * 4  # at least both models' fp32 logits
    assert est("triton", 65536, 4096, 128256, torch.bfloat16, 3, 0) < 256 << 20
    assert est("chunked", 8192, 4096, 128256, torch.bfloat16, 3, 0) < reference / 4
    offset = kernels.device.offset_extra_bytes_estimate
    materialized = offset("reference", 8192, 4096, 1024, 128256, torch.bfloat16)
    assert materialized >= 3 * 8192 * 128256 * 4  # at least the three heads' fp32 logits
    assert offset("chunked", 8192, 4096, 1024, 128256, torch.bfloat16) < materialized / 10
    assert offset("auto", 8192, 4096, 1024, 128256, torch.bfloat16) < materialized / 10


def test_module_imports_without_triton_and_runs_standalone(tmp_path):
    """`python -m kernels.profile` (for a GPU image without the CLI's dependencies) with triton unimportable."""
    code = ("import sys, runpy; sys.modules['triton'] = None; sys.argv = ['profile'] + sys.argv[1:]; "
            "runpy.run_module('kernels.profile', run_name='__main__')")
    common = ["--impl", "reference", "--repeats", "1", "--csv", str(tmp_path / "k.csv"), "--plot", str(tmp_path / "k.png")]
    ok = subprocess.run([sys.executable, "-c", code, "--shape", "32,100", "--tokens", "8", *common],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "reference" in ok.stdout and len(read_csv(tmp_path / "k.csv")) == 2
    bad = subprocess.run([sys.executable, "-c", code, "--shape", "nope", "--tokens", "8", *common],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--shape 'nope'" in bad.stderr
