#!/usr/bin/env python3
"""The GPU suite: every measurement of issue 17 and the reruns, one command, in under 9 minutes on
one H100/H200 (run it through ``scripts/gpu_suite.sh``).

Parts, in order, each time-boxed (its box is cut to what is left of ``--budget``, counted from the
start, set-up included; a part that outlives its box is killed, with everything it started, and
the next one runs):

    part      value  box   what
    tests         1  150s  python -m pytest -n 8 -m "not driver": the whole test suite on the GPU
    vmm           4   45s  scripts/bench_vmm.py: p50/p99 per VMM call, 1-8 threads; access experiment
    growth        8   30s  scripts/bench_growth.py: strategies for one-page growth under 1 ms
    kvcached     16   70s  scripts/bench_kvcached.py: pyvattn next to kvcached (built from its
                           sdist in the background while the tests run)
    paged        32   90s  scripts/bench_paged.py: contiguous vs paged decode attention
    decode       64   80s  scripts/bench_cuda.py --only decode,graphs,attention: the decode loop,
                           every step taken apart (the tail), and attention on pyvattn memory
    rerun       128   55s  python -m pyvattn demo, and python -m pyvattn frag --measured

Exit status: 0 when every part passed; 2 for bad arguments or a machine the suite cannot run on
(no CUDA GPU for torch, no cffi: nothing ran); otherwise the sum of the values of the parts that
failed or ran out of time (a skipped part is not a failure). JSON of
each part and ``gpu_suite.json`` (machine: device, driver, CUDA, torch, date; every part's status
and time) go to ``--results`` (default benchmarks/results/), logs to ``RESULTS/gpu_suite-logs/``.
To bring the results back from a lent machine, tar that folder.

``--cpu-check`` (alias ``--dry-run``) runs in seconds without a GPU: every part's GPU command line
is parsed by that part's own parser (without running it), then the code paths a CPU can run are
run in this process on small sizes (the VMM benchmarks against ``--driver-lib``, a stand-in
libcuda such as tests/stubs/libcuda_stub.c, when given); the rest says "skipped: no GPU".

``--fetch-wheels`` (on a machine with network) downloads what the GPU machine lacks into
``--wheels`` (default .cache/wheels, git-ignored): cffi and pycparser (pyvattn's FFI), posix_ipc
and the kvcached source distribution. The GPU run installs them from there, offline.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
BUDGET_S = 540  # 9 minutes
WHEELS = {"cffi": "cffi==2.1.1", "pycparser": "pycparser==3.12", "posix_ipc": "posix_ipc==1.3.2"}
KVCACHED = "kvcached==0.1.6"
GPU_PYTHON = "3.12"  # the lent machines' python3 (KINDS.md)


@dataclass
class Part:
    """One part of the suite: its GPU command lines (argv after the interpreter, ``{R}`` standing for
    the results folder), its time box, and the command lines of its CPU check (run in-process; None:
    nothing a CPU can run)."""

    name: str
    value: int
    box_s: int
    what: str
    commands: list[list[str]]
    cpu: list[list[str]] | None = None
    needs_driver_lib: bool = False

    def fill(self, argv: list[str], results: Path, extra: dict | None = None) -> list[str]:
        values = {"R": str(results), **(extra or {})}
        return [a.format(**values) for a in argv]


PARTS = [
    Part("tests", 1, 150, "the test suite on the GPU (pytest -m 'not driver', 8 xdist workers)",
         [["-m", "pytest", "-q", "-n", "8", "-m", "not driver", "-p", "no:cacheprovider"]]),
    Part("vmm", 4, 45, "p50/p99 per VMM call from 1-8 threads; does access outlive an unmap",
         [["scripts/bench_vmm.py", "--out", "{R}/bench_vmm.json"]],
         [["scripts/bench_vmm.py", "--driver-lib", "{lib}", "--threads", "1,2", "--sizes", "2MiB,4MiB",
           "--pages", "64", "--out", "{R}/bench_vmm_smoke_cpu.json"]], needs_driver_lib=True),
    Part("growth", 8, 30, "one-page growth of 32 layers: strategies side by side",
         [["scripts/bench_growth.py", "--out", "{R}/bench_growth.json"]],
         [["scripts/bench_growth.py", "--driver-lib", "{lib}", "--layers", "2", "--repeat", "2", "--threads", "2",
           "--units", "2", "--out", "{R}/bench_growth_smoke_cpu.json"]], needs_driver_lib=True),
    Part("kvcached", 16, 70, "pyvattn next to kvcached: decode growth and release of a batch",
         [["scripts/bench_kvcached.py", "--out", "{R}/bench_kvcached.json"]],
         [["scripts/bench_kvcached.py", "--device", "cpu", "--layers", "1", "--batch", "3", "--steps", "20",
           "--prompt", "10", "--spread", "20", "--out", "{R}/bench_kvcached_smoke_cpu.json"]]),
    Part("paged", 32, 90, "decode attention: pyvattn's contiguous cache vs a paged kernel",
         [["scripts/bench_paged.py", "--out", "{R}/bench_paged.json"]],
         [["scripts/bench_paged.py", "--device", "cpu", "--dtype", "float32", "--check-lens", "37,130",
           "--out", "{R}/bench_paged_smoke_cpu.json"]]),
    Part("decode", 64, 80, "decode loop, every step taken apart; attention on pyvattn memory",
         [["scripts/bench_cuda.py", "--only", "decode,graphs,attention", "--out", "{R}/bench_cuda.json"]],
         [["scripts/bench_cuda.py", "--device", "cpu", "--backend", "host", "--only", "decode,attention",
           "--layers", "1", "--batch", "2", "--steps", "16", "--max-seq", "256", "--attn-len", "64",
           "--warmup", "1", "--repeat", "1", "--dtype", "float32", "--out", "{R}/bench_cuda_smoke_cpu.json"]]),
    Part("rerun", 128, 55, "the demo and measured frag on cuda-vmm",
         [["-m", "pyvattn", "demo", "--device", "cuda", "--backend", "cuda-vmm"],
          ["-m", "pyvattn", "frag", "--trace", "arxiv", "--model", "llama-3-8b", "--tp", "2", "--measured",
           "--backend", "cuda-vmm", "--device", "cuda", "--out", "{R}/frag-measured", "--no-plots"]],
         [["-m", "pyvattn", "demo", "--device", "cpu", "--requests", "2", "--layers", "1"]]),
]
NAMES = [p.name for p in PARTS]


@dataclass
class Outcome:
    name: str
    value: int
    status: str  # "ok", "failed (...)", "timeout after N s", "skipped: ..."
    seconds: float = 0.0
    box_s: float = 0.0
    log: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return not self.status.startswith(("ok", "skipped"))


# --- GPU mode: each command a process of its own, killed with its children at the box ----------
def run_boxed(cmd: list[str], box_s: float, log, env: dict) -> str:
    """Run ``cmd`` in its own process group, output to ``log``; "ok", "failed (exit N)" or
    "timeout after N s" (the whole group killed)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, box_s))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timeout after {box_s:.0f} s"
    except BaseException:  # Ctrl-C: take the part's processes down too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return "ok" if rc == 0 else f"failed (exit {rc})"


class KvcachedBuild:
    """kvcached built from its sdist into its own folder, in the background (it compiles a C++
    extension against the torch there: about a minute), so the part that needs it can wait."""

    def __init__(self, sdist: Path | None, site: Path, log_path: Path, env: dict):
        self.site, self.status, self._proc = site, "skipped: no kvcached sdist in the wheels folder", None
        if sdist is None:
            return
        self._log = open(log_path, "w")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
               "--no-cache-dir", "--target", str(site), str(sdist)]
        self._log.write(" ".join(cmd) + "\n")
        self._log.flush()
        self._proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**env, "MAX_JOBS": "8"}, start_new_session=True)
        self.status = "building"

    def wait(self, timeout_s: float) -> str:
        if self._proc is not None and self.status == "building":
            try:
                rc = self._proc.wait(timeout=max(1.0, timeout_s))
                self.status = "ok" if rc == 0 else f"failed (exit {rc}; see its log)"
            except subprocess.TimeoutExpired:
                self.kill()
                self.status = f"timeout after {timeout_s:.0f} s"
            self._log.close()
        return self.status

    def kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._log.close()


def install_wheels(wheels: Path, site: Path, log) -> str:
    """Install the carried wheels (never from a registry) into ``site``."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return "no wheels"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return f"installed {len(found)} wheels" if done.returncode == 0 else f"pip failed (exit {done.returncode})"


def gpu_run(args, results: Path, started: float) -> list[Outcome]:
    """Install the carried wheels, check the machine can run the suite, start kvcached's build,
    then run the parts; the temporary site folders go when it is done."""
    logs = results / "gpu_suite-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyvattn-gpu-suite-") as work:
        site, kvc_site = Path(work) / "site", Path(work) / "kvcached"
        with open(logs / "setup.log", "w") as log:
            wheels_status = install_wheels(Path(args.wheels), site, log)
        path = [str(REPO), str(site)]
        inherited = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + ([inherited] if inherited else [])),
                   PYTHONUNBUFFERED="1")
        sys.path[:0] = path
        print(f"setup: {wheels_status} from {args.wheels}", flush=True)
        problem = preflight()
        if problem:
            raise Unrunnable(f"{problem} ({wheels_status} from {args.wheels})")
        chosen = [p for p in PARTS if p.name in args.only]
        sdist = next(iter(sorted(Path(args.wheels).glob("kvcached-*.tar.gz"))), None)
        kvc = KvcachedBuild(sdist if any(p.name == "kvcached" for p in chosen) else None, kvc_site,
                            logs / "kvcached-build.log", env)
        try:
            return run_parts(chosen, started + args.budget, results, logs, env, kvc)
        finally:
            kvc.kill()


def run_parts(chosen: list[Part], deadline: float, results: Path, logs: Path, env: dict,
              kvc: KvcachedBuild) -> list[Outcome]:
    """Every part in its box (cut to what is left before ``deadline``), one after the other."""
    outcomes = []
    progress = _progress(chosen)
    try:
        for part in chosen:
            left = deadline - time.perf_counter()
            box = min(part.box_s, left)
            if box < 15:
                outcomes.append(Outcome(part.name, part.value, f"skipped: out of suite time ({left:.0f} s left)"))
                continue
            t0 = time.perf_counter()
            part_env = env
            out = Outcome(part.name, part.value, "ok", box_s=box, log=str(logs / f"{part.name}.log"))
            if part.name == "kvcached":
                built = kvc.wait(box - 45)  # leave the benchmark itself 45 s
                out.notes.append(f"kvcached build: {built}")
                if built == "ok":
                    part_env = {**env, "PYTHONPATH": os.pathsep.join([str(kvc.site), env["PYTHONPATH"]])}
            with open(out.log, "w") as log:
                for argv in part.commands:
                    cmd = [sys.executable, *part.fill(argv, results)]
                    log.write(f"$ {' '.join(cmd)}\n")
                    log.flush()
                    left_in_box = box - (time.perf_counter() - t0)
                    status = run_boxed(cmd, left_in_box, log, part_env) if left_in_box >= 1 else \
                        f"timeout after {box:.0f} s"
                    if status != "ok":
                        out.status = status
                        break
            out.seconds = time.perf_counter() - t0
            out.notes += _log_notes(part.name, Path(out.log))
            outcomes.append(out)
            progress.update(part, out)
    finally:
        progress.close()
    return outcomes


class Unrunnable(Exception):
    """This machine cannot run the suite at all (nothing ran)."""


def preflight() -> str | None:
    """Why the suite cannot run here (no CUDA GPU for torch, no cffi), or None: found in seconds,
    not after every part has failed for the same reason."""
    try:
        import cffi  # noqa: F401 - pyvattn's FFI
    except ImportError:
        return ("cffi is not importable: run scripts/gpu_suite.sh --fetch-wheels where there is network "
                "and bring the wheels folder along")
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def _log_notes(name: str, log: Path) -> list[str]:
    """The line worth showing from a part's log (pytest's result line)."""
    if name != "tests":
        return []
    lines = log.read_text(errors="replace").splitlines()
    hits = [ln.strip("= ") for ln in lines if re.search(r"\d+ (passed|failed|error)", ln)]
    return hits[-1:]


class _progress:
    """A tqdm bar over the parts, weighted by their boxes (so its ETA is an upper bound)."""

    def __init__(self, parts: list[Part]):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=sum(p.box_s for p in parts), unit="s", desc="gpu suite", file=sys.stderr,
                            bar_format="{desc}: {n:.0f}/{total:.0f} s of boxes {bar} [{elapsed}<{remaining}]")
        except ImportError:
            self.bar = None

    def update(self, part: Part, out: Outcome) -> None:
        if self.bar is not None:
            self.bar.update(part.box_s)
            self.bar.write(f"{part.name}: {out.status} in {out.seconds:.0f} s" +
                           (f" ({'; '.join(out.notes)})" if out.notes else ""))
        else:
            print(f"{part.name}: {out.status} in {out.seconds:.0f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- CPU check: parse every GPU command, run what a CPU can, in this process -------------------
class _Parsed(Exception):
    """Raised by argparse in parse-only mode once the arguments are parsed."""


@contextlib.contextmanager
def parse_only():
    """Make every ``ArgumentParser.parse_args`` stop the program right after parsing."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def entry_point(argv: list[str]):
    """The ``main(argv) -> int`` behind a command line (a script path or ``-m module``), and its args."""
    if argv[0] == "-m":
        if argv[1] == "pyvattn":
            from pyvattn.__main__ import main
            return main, argv[2:]
        raise ValueError(f"no in-process entry point for -m {argv[1]}")
    path = REPO / argv[0]
    name = f"_suite_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name].main, argv[1:]


def check_parses(argv: list[str]) -> str | None:
    """None if ``argv`` parses with its program's own parser, else why not."""
    main, rest = entry_point(argv)
    err = io.StringIO()
    try:
        with parse_only(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(rest)
    except _Parsed:
        return None
    except SystemExit as exc:
        return f"{' '.join(argv)}: rejected (exit {exc.code}): {err.getvalue().strip()[-300:]}"
    return f"{' '.join(argv)}: ran without parsing arguments"


def cpu_check(args, results: Path) -> list[Outcome]:
    logs = results / "gpu_suite-logs"
    logs.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(SCRIPTS), str(REPO)]
    outcomes = []
    for part in (p for p in PARTS if p.name in args.only):
        t0 = time.perf_counter()
        out = Outcome(part.name, part.value, "ok", log=str(logs / f"{part.name}.log"))
        with open(out.log, "w") as log:
            try:
                for argv in part.commands:
                    if argv[:2] == ["-m", "pytest"]:
                        continue  # pytest's option parser is not argparse's; `make test` runs it here
                    problem = check_parses(part.fill(argv, results))
                    if problem:
                        out.status = f"failed (GPU command line: {problem})"
                if out.status == "ok":
                    out.status = _run_cpu_paths(part, args, results, log)
            except Exception as exc:  # a part that cannot even load is its failure, not the suite's
                out.status = f"failed ({type(exc).__name__}: {str(exc)[:200]})"
                log.write(f"{out.status}\n")
        out.seconds = time.perf_counter() - t0
        outcomes.append(out)
        print(f"{part.name}: {out.status} in {out.seconds:.1f} s", flush=True)
    return outcomes


def _run_cpu_paths(part: Part, args, results: Path, log) -> str:
    if part.cpu is None:
        return "skipped: no GPU (here `make test` runs the same suite; its GPU tests skip)"
    if part.needs_driver_lib and not args.driver_lib:
        return "skipped: no GPU (give --driver-lib to run it on a stand-in libcuda)"
    for argv in part.cpu:
        argv = part.fill(argv, results, {"lib": args.driver_lib or ""})
        main, rest = entry_point(argv)
        log.write(f"$ {' '.join(argv)}\n")
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                rc = main(rest)
        except SystemExit as exc:
            rc = exc.code
        log.flush()
        if rc not in (0, None):
            return f"failed (exit {rc}; see {log.name})"
    return "ok (CPU paths)"


# --- fetching what the GPU machine lacks ---------------------------------------------------------
def fetch_wheels(wheels: Path) -> int:
    """Download the wheels and the kvcached sdist into ``wheels`` (here, with network)."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels)]
    platform = ["--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp"]
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
                "manylinux1_x86_64"):
        platform += ["--platform", tag]
    for spec in WHEELS.values():
        if subprocess.run(pip + platform + [spec]).returncode:
            return 1
    # kvcached ships only an sdist whose setup.py imports torch (a CUDA build) just to compute its
    # metadata; pip needs that metadata before it saves the file, so it gets a stand-in torch
    # exposing what setup.py reads. Nothing is built here: the GPU machine builds it.
    with tempfile.TemporaryDirectory() as stand_in:
        _write_stand_in_torch(Path(stand_in))
        env = {**os.environ, "PYTHONPATH": stand_in}
        if subprocess.run(pip + ["--no-binary=:all:", "--no-build-isolation", KVCACHED], env=env).returncode:
            return 1
    print(f"\n{wheels}: " + ", ".join(sorted(p.name for p in wheels.iterdir() if p.is_file())))
    print("carry this folder to the GPU machine (it is git-ignored) and run scripts/gpu_suite.sh there")
    return 0


def _write_stand_in_torch(root: Path) -> None:
    pkg = root / "torch"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        '__version__ = "2.11.0"\n'
        "class version:\n    cuda = '13.0'\n    hip = None\n    xpu = None\n"
        "class _C:\n    _GLIBCXX_USE_CXX11_ABI = 1\n")
    (pkg / "utils" / "__init__.py").write_text("")
    (pkg / "utils" / "cpp_extension.py").write_text(
        "from setuptools import Extension\n"
        "from setuptools.command.build_ext import build_ext as BuildExtension\n"
        "def CUDAExtension(name, sources, **kw):\n    return Extension(name, sources)\n"
        "CppExtension = CUDAExtension\n"
        "def include_paths(*a, **k):\n    return []\n"
        "def library_paths(*a, **k):\n    return []\n")


# --- report -------------------------------------------------------------------------------------
def exit_status(outcomes: list[Outcome]) -> int:
    return sum(o.value for o in outcomes if o.failed)


def render(outcomes: list[Outcome], mode: str, total_s: float) -> str:
    rows = [[o.name, o.value, o.status, f"{o.seconds:.0f}" if mode == "gpu" else f"{o.seconds:.1f}",
             f"{o.box_s:.0f}" if o.box_s else "-", "; ".join(o.notes)] for o in outcomes]
    width = [max(len(str(r[i])) for r in rows + [["part", "value", "status", "s", "box", "notes"]]) for i in range(6)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, width))  # noqa: E731
    code = exit_status(outcomes)
    failed = [o for o in outcomes if o.failed]
    why = f" = {' + '.join(str(o.value) for o in failed)} ({', '.join(o.name for o in failed)})" if failed else ""
    return "\n".join([f"\nGPU suite ({mode}) summary, {total_s:.0f} s:",
                      line(["part", "value", "status", "s", "box", "notes"]), *map(line, rows),
                      f"exit status {code}{why}"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/gpu_suite.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cpu-check", "--dry-run", action="store_true", dest="cpu_check",
                      help="parse every part's GPU command and run the CPU-runnable paths, in seconds")
    mode.add_argument("--fetch-wheels", action="store_true", help="download what the GPU machine lacks into --wheels")
    ap.add_argument("--only", default=",".join(NAMES), help=f"parts to run, of {','.join(NAMES)} (default: all)")
    ap.add_argument("--results", default=None,
                    help="folder for JSON and logs (default benchmarks/results/, with --cpu-check its "
                         "git-ignored cpu-check/ subfolder)")
    ap.add_argument("--wheels", default=str(REPO / ".cache" / "wheels"), help="carried wheels and the kvcached sdist")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole suite (default {BUDGET_S})")
    ap.add_argument("--driver-lib", default=None, help="--cpu-check: a stand-in libcuda for the VMM benchmarks")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in args.only if x not in NAMES]
    if bad or not args.only:
        ap.error(f"--only {','.join(bad) or '(empty)'}: parts are {','.join(NAMES)}")
    if args.budget <= 0:
        ap.error("--budget must be positive")
    if args.driver_lib and not Path(args.driver_lib).is_file():
        ap.error(f"--driver-lib {args.driver_lib}: no such file")
    if args.fetch_wheels:
        return fetch_wheels(Path(args.wheels))
    default = REPO / "benchmarks" / "results"
    results = Path(args.results).resolve() if args.results else (default / "cpu-check" if args.cpu_check else default)
    mode = "cpu-check" if args.cpu_check else "gpu"
    t0 = time.perf_counter()
    try:
        outcomes = cpu_check(args, results) if args.cpu_check else gpu_run(args, results, t0)
    except Unrunnable as exc:
        print(f"gpu_suite: nothing ran: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t0
    print(render(outcomes, mode, total))
    summary = {"mode": mode, "seconds": total, "budget_s": args.budget, "exit_status": exit_status(outcomes),
               "parts": [vars(o) for o in outcomes]}
    with contextlib.suppress(Exception):  # facts are a bonus; the summary is written regardless
        sys.path[:0] = [str(SCRIPTS), str(REPO)]
        import benchlib

        summary["machine"] = benchlib.machine_facts("cuda" if mode == "gpu" else "cpu")
    out = results / ("gpu_suite.json" if mode == "gpu" else "gpu_suite_cpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {out}")
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
