"""The GPU suite (scripts/gpu_suite.sh) and its benchmarks, checked as far as a CPU allows.

The suite's CPU check runs every part's argument parsing and CPU-runnable code paths (the VMM
benchmarks against the stub libcuda of tests/stubs/); the numbers themselves need a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cudastub import stub, stub_library  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def script(name: str):
    """A script of scripts/ loaded as a module (its ``benchlib`` import needs scripts/ on the path)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    key = f"_test_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


# --- the suite end to end --------------------------------------------------------------------------
def test_cpu_check_runs_every_part_and_says_what_needs_a_gpu(stub_library, tmp_path):
    """The CI check of issue 17's suite: one command, seconds, every part accounted for."""
    env = dict(os.environ, PYTHON=sys.executable)
    t0 = time.perf_counter()
    done = subprocess.run([str(SCRIPTS / "gpu_suite.sh"), "--cpu-check", "--driver-lib", str(stub_library),
                           "--results", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "gpu_suite_cpu_check.json").read_text())
    status = {p["name"]: p["status"] for p in summary["parts"]}
    assert list(status) == ["tests", "vmm", "growth", "kvcached", "paged", "decode", "rerun"]
    assert status.pop("tests").startswith("skipped: no GPU")
    assert all(s == "ok (CPU paths)" for s in status.values()), status
    assert "exit status 0" in done.stdout and summary["exit_status"] == 0
    print(f"cpu check: {elapsed:.1f} s")

    vmm = json.loads((tmp_path / "bench_vmm_smoke_cpu.json").read_text())
    assert vmm["device_name"] == "Stub GPU" and len(vmm["configs"]) == 4
    for config in vmm["configs"]:
        assert "error" not in config
        ops = config["ops_us"]
        assert ops["cuMemCreate"]["n"] == 64 * config["threads"]
        assert ops["cuMemSetAccess fresh, run of 64"]["pages_per_call"] == 64
        assert ops["cuMemSetAccess fresh, run of 64"]["n"] >= 32
    probe = vmm["access_probe"]  # the stub keeps access per mapping, as we expect of the driver
    assert probe["set_access_over_a_range_with_an_unmapped_page"] == "CUDA_ERROR_INVALID_VALUE"
    assert (probe["flags_after_a_fresh_map"], probe["flags_after_set_access"],
            probe["flags_after_unmap_and_map_again"]) == (0, 3, 0)
    assert probe["flags_of_a_page_mapped_into_a_range_whose_access_was_set_once"] == 0
    assert probe["flags_of_its_neighbour_left_mapped"] == 3 and probe["access_survives_unmap"] is False
    assert vmm["access_probe_touch"].startswith("skipped: no GPU")

    growth = json.loads((tmp_path / "bench_growth_smoke_cpu.json").read_text())
    assert set(growth["strategies"]) == {"backend", "driver", "interleaved", "prewarmed", "threads-2", "unit-2",
                                         "map-only"}
    assert growth["strategies"]["unit-2"]["unit_bytes"] == 2 * growth["granularity"]
    assert not growth["strategies"]["map-only"]["usable"]

    paged = json.loads((tmp_path / "bench_paged_smoke_cpu.json").read_text())
    checked = paged["numerics"]["kernels"]
    assert set(checked) == {"contiguous (sdpa)", "contiguous flex", "paged flex (128-token pages)"}
    assert all(r["ok"] and r["rel_error"] < 1e-5 for r in checked.values()), checked

    kvc = json.loads((tmp_path / "bench_kvcached_smoke_cpu.json").read_text())
    ours = kvc["sides"]["pyvattn (host)"]
    assert ours["ms"]["admit"]["n"] == 3 and ours["ms"]["decode step"]["n"] == 20
    assert ours["memory"]["peak (end of decode)"]["mapped_bytes"] > 0
    assert ours["memory"]["after release"]["mapped_bytes"] == 0
    assert all(s["skipped"] == "skipped: no GPU" for n, s in kvc["sides"].items() if n.startswith("kvcached"))

    decode = json.loads((tmp_path / "bench_cuda_smoke_cpu.json").read_text())["decode_loop"]
    for mode in ("premapped", "step", "step_async"):
        steps = decode[mode]["steps"]
        assert len(steps["total_ms"]) == 16 - 1  # the warmup step is not recorded
        assert decode[mode]["tail"]["slow_steps"] >= 1
    assert decode["step"]["tail"]["steps_mapping_in_step"] >= 1  # staggered lengths cross pages


def test_gpu_mode_on_a_machine_without_a_gpu_runs_nothing_and_says_why(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu_suite.py"), "--wheels", str(tmp_path / "none"),
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "nothing ran: torch" in done.stderr and "sees no CUDA GPU" in done.stderr
    assert not (tmp_path / "gpu_suite.json").exists()


def test_gpu_mode_runs_parts_in_processes_and_reports_their_failure(tmp_path, monkeypatch, capsys):
    """GPU mode past its machine check: the vmm part's process exits 2 here (no driver), the suite
    logs it, records it, and says so in its exit status (4, the part's value)."""
    suite = script("gpu_suite")
    monkeypatch.setattr(suite, "preflight", lambda: None)  # run the parts whatever the machine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # and let them see no GPU, even on a GPU machine
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheels = tmp_path / "no-wheels"
    wheels.mkdir()
    assert suite.main(["--only", "vmm", "--wheels", str(wheels), "--results", str(tmp_path)]) == 4
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    (part,) = summary["parts"]
    assert part["name"] == "vmm" and part["status"] == "failed (exit 2)"
    log = Path(part["log"]).read_text()
    assert "bench_vmm.py" in log and "no CUDA driver to measure" in log
    assert "exit status 4 = 4 (vmm)" in out


def test_a_part_past_its_box_is_killed_with_its_children(tmp_path):
    suite = script("gpu_suite")
    marker = tmp_path / "child.pid"
    cmd = [sys.executable, "-c",
           "import subprocess, sys, time\n"
           f"p = subprocess.Popen(['sleep', '60'])\nopen({str(marker)!r}, 'w').write(str(p.pid))\n"
           "time.sleep(60)"]
    t0 = time.perf_counter()
    with open(tmp_path / "log", "w") as log:
        status = suite.run_boxed(cmd, 2, log, dict(os.environ))
    assert status == "timeout after 2 s"
    assert time.perf_counter() - t0 < 20
    child = int(marker.read_text())
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.kill(child, 0)  # still there (perhaps a zombie waiting for init)?
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the part's child process outlived the time box")
    with open(tmp_path / "log", "w") as log:
        assert suite.run_boxed([sys.executable, "-c", "raise SystemExit(3)"], 30, log, dict(os.environ)) == \
            "failed (exit 3)"


def test_exit_status_names_the_failed_parts_and_is_never_2():
    suite = script("gpu_suite")
    values = [p.value for p in suite.PARTS]
    assert len(set(values)) == len(values) and all(v & (v - 1) == 0 for v in values)  # one bit each
    out = [suite.Outcome(p.name, p.value, "ok") for p in suite.PARTS]
    assert suite.exit_status(out) == 0
    out[1].status, out[4].status, out[6].status = "failed (exit 1)", "timeout after 90 s", "skipped: no kvcached"
    assert suite.exit_status(out) == 4 + 32
    rendered = suite.render(out, "gpu", 100)
    assert "exit status 36 = 4 + 32 (vmm, paged)" in rendered
    for mask in range(1 << len(values)):  # no combination of failures reads as "bad arguments"
        assert sum(v for i, v in enumerate(values) if mask >> i & 1) not in (2, 3) or mask == 0


@pytest.mark.parametrize("argv, match", [
    (["--only", "vmm,nope"], "--only nope"),
    (["--budget", "0"], "--budget"),
    (["--driver-lib", "/nonexistent/libcuda.so"], "--driver-lib"),
    (["--cpu-check", "--fetch-wheels"], "not allowed with"),
])
def test_suite_rejects_bad_arguments_with_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        script("gpu_suite").main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("name, argv, match", [
    ("bench_vmm", ["--threads", "0"], "--threads"),
    ("bench_vmm", ["--sizes", "two"], "--sizes"),
    ("bench_vmm", ["--device", "cpu"], "--device"),
    ("bench_vmm", ["--pages", "8"], "--pages"),
    ("bench_growth", ["--layers", "0"], "--layers"),
    ("bench_growth", ["--units", "1,x"], "--units"),
    ("bench_paged", ["--batches", "-1"], "--batches"),
    ("bench_paged", ["--device", "cuda"] if not torch.cuda.is_available() else ["--repeat", "0"], ""),
    ("bench_kvcached", ["--batch", "0"], "--batch"),
    ("bench_cuda", ["--only", "decode,nope"], "--only"),
    ("bench_cuda", ["--steps", "0"], "--steps"),
])
def test_benchmarks_reject_bad_arguments_with_exit_2(name, argv, match, capsys):
    try:
        code = script(name).main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert match in capsys.readouterr().err


def test_parse_only_stops_after_parsing_and_restores_argparse():
    suite = script("gpu_suite")
    assert suite.check_parses(["scripts/bench_paged.py", "--batches", "1,2"]) is None
    problem = suite.check_parses(["scripts/bench_paged.py", "--batches", "x"])
    assert problem and "rejected (exit 2)" in problem and "--batches" in problem
    assert suite.check_parses(["-m", "pyvattn", "frag", "--trace", "arxiv", "--measured"]) is None
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--x", type=int)
    assert ap.parse_args(["--x", "3"]).x == 3  # argparse is itself again


def test_every_gpu_command_line_parses():
    """The suite's GPU command lines against the current parsers (a renamed option shows here)."""
    suite = script("gpu_suite")
    for part in suite.PARTS:
        for argv in part.commands:
            if argv[:2] != ["-m", "pytest"]:
                assert suite.check_parses(part.fill(argv, Path("/tmp/r"))) is None, (part.name, argv)


def test_kvcached_build_without_an_sdist_is_skipped(tmp_path):
    build = script("gpu_suite").KvcachedBuild(None, tmp_path / "site", tmp_path / "log", dict(os.environ))
    assert build.wait(1).startswith("skipped: no kvcached sdist")
    build.kill()


# --- pieces of the benchmarks ----------------------------------------------------------------------
def test_decode_tail_causes_are_told_apart():
    bench = script("bench_cuda")
    n = 200
    log = {"total_ms": [5.0] * n, "step_ms": [0.05] * n, "launch_ms": [0.3] * n, "submit_ms": [0.01] * n,
           "gpu_ms": [4.8] * n, "map_in_step": [False] * n, "async_map": [False] * n, "round": [0] * n}
    log["async_map"][10] = True  # a map issued beside step 10's work, still running at step 11's join
    log["step_ms"][11], log["total_ms"][11] = 2.5, 7.5
    log["map_in_step"][50], log["step_ms"][50], log["total_ms"][50] = True, 2.1, 7.2
    log["launch_ms"][90], log["total_ms"][90] = 9.0, 14.0
    log["gpu_ms"][120], log["total_ms"][120] = 7.0, 7.1
    log["total_ms"][150] = 30.0  # nothing else unusual: the machine
    t = bench.tail_causes(log, slow_fraction=0.025)
    assert t["slow_steps"] == 5
    by_index = {s["index"]: s["causes"] for s in t["slowest"]}
    assert by_index == {150: ["machine"], 90: ["launch blocked"], 11: ["join wait"], 50: ["map in step()"],
                        120: ["GPU slower"]}
    assert t["causes"] == {"machine": 1, "launch blocked": 1, "join wait": 1, "map in step()": 1, "GPU slower": 1}
    assert t["steps_with_map_beside"] == 1 and t["steps_mapping_in_step"] == 1


def test_page_crossing_arithmetic():
    crossing = script("bench_cuda").crossing
    tb, P = 2048, 2 << 20  # 1024 tokens per page
    assert crossing(np.array([1024, 5]), tb, P)  # 1024 -> 1025 needs a second page
    assert not crossing(np.array([1023, 5]), tb, P)  # 1023 -> 1024 still fits the first
    assert crossing(np.array([0]), tb, P)


def test_paged_copy_puts_every_token_where_its_block_table_says(tmp_path):
    bench = script("bench_paged")
    gen = torch.Generator().manual_seed(3)
    lens = torch.tensor([5, 0, 33, 16])
    cache = torch.randn(4, 40, 2, 3, generator=gen)
    table = bench.shuffled_pages(lens, 8, gen)
    counts = (lens + 7) // 8
    assert ((table >= 0).sum(1) == counts).all()
    used = table[table >= 0]
    assert sorted(used.tolist()) == list(range(int(counts.sum())))  # every page once, shuffled
    pages = bench.paged_copy(cache, lens, table, 8)
    for b, n in enumerate(lens.tolist()):
        for t in range(n):
            assert torch.equal(pages[table[b, t // 8], t % 8], cache[b, t])


def test_pages_per_thread_fit_the_device():
    pages_for = script("bench_vmm").pages_for
    MiB, GiB = 1 << 20, 1 << 30
    assert pages_for(2 * MiB, 8, 256, 2 * GiB, 100 * GiB) == 256
    assert pages_for(32 * MiB, 8, 256, 2 * GiB, 100 * GiB) == 64  # memory per thread caps it
    assert pages_for(2 * MiB, 8, 256, 2 * GiB, GiB + 8 * 128 * 2 * MiB) == 128  # free memory does
    assert pages_for(32 * MiB, 8, 256, 2 * GiB, 4 * GiB) == 0  # not even 64 fit: skipped


def test_paged_report_of_a_gpu_run(tmp_path):
    """What bench_paged prints and plots from a GPU run's results (made up here: the rendering
    must not wait for a GPU session to be found broken)."""
    bench = script("bench_paged")
    names = ["contiguous (torch-flash)", "paged flash-attn (256-token pages)", "contiguous flex",
             "paged flex (128-token pages)"]
    row = {"batch": 64, "context": 4096,
           "ms": {names[0]: 1.0, names[1]: 1.5, names[2]: 1.2, names[3]: 1.8}}
    assert bench.ratios(row, names) == {"paged flash-attn / contiguous (torch-flash)": 1.5,
                                        "paged flex / contiguous (torch-flash)": 1.8,
                                        "flex: paged / contiguous": 1.5}
    row["ratios"] = bench.ratios(row, names)
    skipped = {"batch": 256, "context": 32768, "ms": {}, "ratios": {}, "skipped": "out of time (--time-budget 60 s)"}
    failed = {"batch": 1, "context": 1024, "ms": {names[0]: 0.01, names[3]: None}, "ratios": {},
              "errors": {names[3]: "RuntimeError: boom"}}
    result = {"kernels": names, "dtype": "float16", "machine": {"gpu": "NVIDIA H200"}, "shapes": [skipped, row, failed],
              "numerics": {"lens": [1, 130], "tolerance": 5e-3,
                           "kernels": {names[0]: {"rel_error": 1e-4, "ok": True},
                                       names[3]: {"error": "RuntimeError: no", "ok": False}}}}
    text = bench.render(result)
    assert "1.50x" in text and "1.80x" in text and "out of time" in text and "RuntimeError: no" in text
    assert text.index("| 1 ") < text.index("| 64 ") < text.index("| 256 ")  # sorted by context
    assert bench.plot(result, tmp_path / "paged.png").stat().st_size > 0
    assert bench.verdict(result) == 1  # the paged kernel did not run
    result["numerics"]["kernels"][names[3]] = {"rel_error": 2e-3, "ok": True}
    assert bench.verdict(result) == 0


def test_kvcached_report_puts_both_allocators_side_by_side():
    bench = script("bench_kvcached")
    side = {"ms": {k: {"n": 3, "p50": 1.0, "p99": 2.0, "max": 3.0, "total": 6.0}
                   for k in ("admit", "decode step", "release")},
            "memory": {"after admission": {"mapped_bytes": 2 << 20, "device_used_delta": 4 << 20}}}
    result = {"workload": {"batch": 3, "prompts": [10, 20, 30], "steps": 5, "layers": 2},
              "sides": {"pyvattn (cuda-vmm)": side, "kvcached (with pre-mapping thread)": side,
                        "kvcached (no pre-mapping thread)": {"error": "exit 1: ImportError"}}}
    text = bench.render(result)
    assert text.count("1.000 / 2.000 / 3.000") == 6 and "mapped, after admission (MiB)" in text
    assert "kvcached (no pre-mapping thread): exit 1: ImportError" in text


def test_kvcached_build_from_an_sdist_lands_in_its_own_folder(tmp_path):
    """The background build on a stand-in sdist (pure Python, offline): the same pip command the
    GPU run uses for kvcached's, waited for, and importable from the folder it was built into."""
    import tarfile

    src = tmp_path / "kvcached-0.0.1"
    (src / "kvcached").mkdir(parents=True)
    (src / "setup.py").write_text('from setuptools import setup\nsetup(name="kvcached", version="0.0.1", '
                                  'packages=["kvcached"])\n')
    (src / "kvcached" / "__init__.py").write_text("MARK = 7\n")
    sdist = tmp_path / "kvcached-0.0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    site = tmp_path / "site"
    build = script("gpu_suite").KvcachedBuild(sdist, site, tmp_path / "build.log", dict(os.environ))
    assert build.status == "building"
    assert build.wait(120) == "ok", (tmp_path / "build.log").read_text()
    done = subprocess.run([sys.executable, "-c", "import kvcached; print(kvcached.MARK)"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert done.stdout.strip() == "7"
    build.kill()  # idempotent after the wait


@pytest.mark.parametrize("fail_after", [0, 5, 64, 100, 127, 250])
def test_vmm_bench_leaves_nothing_behind_when_a_map_fails(stub, fail_after):
    """A cuMemMap failing at any point of any phase (on any of two threads): the configuration
    reports the driver's status, every thread gives back all it made, the other thread is released."""
    bench, benchlib = script("bench_vmm"), script("benchlib")
    drv = benchlib.VmmDriver(0)
    stub.stub_fail_map_after = fail_after
    result = bench.measure_config(drv, 2 << 20, 2, 64)
    stub.stub_fail_map_after = -1
    assert "CUDA_ERROR_MAP_FAILED" in result["error"]
    assert (stub.stub_live_handles(), stub.stub_live_mappings(), stub.stub_live_reservations()) == (0, 0, 0)
    ok = bench.measure_config(drv, 2 << 20, 2, 64)  # the driver state is whole: a clean run follows
    assert "error" not in ok and ok["ops_us"]["cuMemRelease"]["n"] == 128
    drv.close()
    assert stub.stub_ctx_refs() == 0


@pytest.mark.parametrize("fail_after", [0, 3, 17, 40])
def test_growth_bench_gives_everything_back_when_a_map_fails(stub, fail_after):
    bench, benchlib = script("bench_growth"), script("benchlib")
    drv = benchlib.VmmDriver(0)
    args = bench.build_parser().parse_args(["--layers", "2", "--repeat", "2", "--threads", "2", "--units", "2"])
    stub.stub_fail_map_after = fail_after
    with pytest.raises(Exception, match="CUDA_ERROR_MAP_FAILED"):
        bench.run(args, torch.device("cuda"), drv)
    stub.stub_fail_map_after = -1
    assert (stub.stub_live_handles(), stub.stub_live_mappings(), stub.stub_live_reservations()) == (0, 0, 0)
    drv.close()


def test_ctrl_c_during_a_part_takes_its_processes_down(tmp_path, monkeypatch):
    suite = script("gpu_suite")
    marker = tmp_path / "pid"
    # written to a temporary name and renamed, so the marker never exists empty
    cmd = [sys.executable, "-c", f"import os, time\nopen({str(marker)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
           f"os.rename({str(marker)!r} + '.tmp', {str(marker)!r})\ntime.sleep(60)"]
    real_wait = subprocess.Popen.wait

    def interrupted_wait(self, timeout=None):
        if timeout is not None:  # the part's wait: the user presses Ctrl-C once it is running
            while not marker.exists():
                time.sleep(0.02)
            raise KeyboardInterrupt
        return real_wait(self)

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted_wait)
    with open(tmp_path / "log", "w") as log, pytest.raises(KeyboardInterrupt):
        suite.run_boxed(cmd, 30, log, dict(os.environ))
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)  # reaped: gone
