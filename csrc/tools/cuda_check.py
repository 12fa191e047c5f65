"""Compile-time check of the CUDA kernel headers, for machines without a GPU (`make cuda-check`).

For every csrc/cuda/*.cuh:
  1. compile it as a standalone translation unit with nvcc for sm_80 and sm_90a, with explicit
     instantiations of its kernels for each dtype (table KERNELS below; a kernel in a header
     without an entry fails the check), using setup.py's nvcc flags;
  2. read `ptxas -v` for sm_90a: registers/thread, shared memory, stack, spill bytes, and the
     theoretical occupancy on an H100 (sm_90) at the launchers' block size. Any spill fails;
  3. disassemble the sm_90a cubin (`cuobjdump -sass`) and find each row kernel's main loop
     (the backward branch that encloses the most global loads): it must load with 128-bit
     LDG.E.128 (LDG.E.128.CONSTANT on the read-only path).
Prints one table; exits non-zero on any failure.

With --launchers it also compiles the ATen launchers csrc/cuda/*.cu against this venv's torch
headers (slow: minutes). A CPU build of torch lacks one generated header,
c10/cuda/impl/cuda_cmake_macros.h; the check supplies a one-line stand-in for it. The
launchers are only compiled, never linked: that needs a CUDA build of torch.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")


def setup_literal(name: str):
    """The literal value of the module-level assignment `name = ...` in setup.py (not run)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"setup.py has no module-level literal {name}")


def header_constant(header: str, name: str) -> int:
    """The integer of `name = <int>` (a constexpr) in csrc/cuda/<header>: launch sizes live there only."""
    m = re.search(rf"\b{name}\s*=\s*(\d+)\s*;", open(os.path.join(CSRC, "cuda", header)).read())
    if m is None:
        raise LookupError(f"csrc/cuda/{header} has no constant {name} = <int>;")
    return int(m.group(1))


# setup.py holds the flags and architectures; this check compiles sm_80 and sm_90a of them.
NVCC_FLAGS = [*setup_literal("NVCC_FLAGS"), f"-I{CSRC}"]
CUDA_ARCHS = setup_literal("CUDA_ARCHS")
for _arch in ("80", "90a"):
    if _arch not in CUDA_ARCHS:
        raise SystemExit(f"cuda-check reads ptxas/SASS for sm_80 and sm_90a; setup.py CUDA_ARCHS = {CUDA_ARCHS}")
ARCH_80 = "-gencode=arch=compute_80,code=sm_80"
ARCH_90A = "-gencode=arch=compute_90a,code=sm_90a"
ROW_THREADS = header_constant("logprobs_op.h", "kRowThreadsMax")  # the launchers' block at large V
TOKEN_KL_THREADS = header_constant("kl.cuh", "kTokenKlThreads")
GAE_THREADS = header_constant("gae.cuh", "kThreads")
DTYPES = ["float", "double", "__nv_bfloat16", "__half"]
NS = "rlhf_engine::kernels::"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel template, the instantiations to check and how it is launched."""

    name: str
    instances: tuple[str, ...]  # template argument lists
    params: str  # parameter type, with {T} for the first template argument
    block: int  # block size the launcher uses for the headline shape (occupancy is computed for it)
    vec128: bool  # its main loop must use 128-bit global loads


def _with_bools(types: list[str]) -> tuple[str, ...]:
    return tuple(f"{t}, {b}" for t in types for b in ("true", "false"))


KERNELS: dict[str, list[Kernel]] = {
    "logprobs.cuh": [
        Kernel("logprobs_fwd_kernel", _with_bools(DTYPES), "LogprobsFwdParams<{T}>", ROW_THREADS, True),
        Kernel("logprobs_bwd_kernel", _with_bools(DTYPES), "LogprobsBwdParams<{T}>", ROW_THREADS, True),
    ],
    "kl.cuh": [
        Kernel("token_kl_fwd_kernel", tuple(DTYPES), "TokenKlParams<{T}>", TOKEN_KL_THREADS, False),
        Kernel("token_kl_bwd_kernel", tuple(DTYPES), "TokenKlParams<{T}>", TOKEN_KL_THREADS, False),
        Kernel("full_kl_fwd_kernel", tuple(DTYPES), "FullKlFwdParams<{T}>", ROW_THREADS, True),
        Kernel("full_kl_bwd_kernel", _with_bools(DTYPES), "FullKlBwdParams<{T}>", ROW_THREADS, True),
    ],
    "gae.cuh": [
        Kernel(
            "gae_kernel",
            (f"float, {GAE_THREADS}, 4", f"double, {GAE_THREADS}, 4"),
            "GaeParams<{T}>",
            GAE_THREADS,
            False,
        ),
    ],
}

# H100 (sm_90) per-SM limits for the occupancy estimate.
SM90 = {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 233472, "smem_reserved_per_block": 1024, "warps": 64}


@dataclasses.dataclass
class PtxasInfo:
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


@dataclasses.dataclass
class Row:
    header: str
    kernel: str  # demangled
    block: int
    info: PtxasInfo
    occupancy: float
    loop_loads: str = "-"
    problems: list[str] = dataclasses.field(default_factory=list)


def nvcc_candidates() -> list[str]:
    """nvcc from $CUDA_HOME/bin, then from PATH (existing ones only)."""
    cands = [os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else ""]
    cands.append(shutil.which("nvcc") or "")
    return [c for c in cands if c and os.access(c, os.X_OK)]


def find_nvcc() -> str:
    cands = nvcc_candidates()
    if not cands:
        sys.exit("cuda-check: nvcc not found (put nvcc on PATH or set CUDA_HOME)")
    return cands[0]


def find_cuda_home() -> str:
    """The toolkit folder (bin/nvcc and include/cuda_runtime.h), for torch's CUDA_HOME.

    A `nvcc` on PATH may be a wrapper script (here /usr/local/bin/nvcc execs the toolkit's), so the
    folder is the TOP that `nvcc --dryrun` reports, not the one above the script.
    """
    for nvcc in nvcc_candidates():
        dry = run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
        m = re.search(r"^#\$ TOP=(.+?)\s*$", dry.stdout + dry.stderr, re.M)
        home = os.path.realpath(m.group(1)) if m else ""
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    sys.exit("cuda-build: no CUDA toolkit found (a folder with bin/nvcc and include/cuda_runtime.h); set CUDA_HOME")


def find_cuobjdump() -> tuple[str, str]:
    """cuobjdump and the folder holding nvdisasm (which `cuobjdump -sass` runs), from the
    PyPI packages nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm or the toolkit."""
    dirs: list[str] = []
    try:
        import nvidia  # namespace package of NVIDIA's PyPI wheels

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "*", "bin")))
    except ImportError:
        pass
    dirs += [os.path.dirname(find_nvcc())]
    cuobjdump = next((os.path.join(d, "cuobjdump") for d in dirs if os.access(os.path.join(d, "cuobjdump"), os.X_OK)), None)
    nvdisasm = next((d for d in dirs if os.access(os.path.join(d, "nvdisasm"), os.X_OK)), None)
    if cuobjdump is None or nvdisasm is None:
        sys.exit(
            "cuda-check: cuobjdump/nvdisasm not found; install them with "
            "`.venv/bin/pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`"
        )
    return cuobjdump, nvdisasm


def kernels_declared(path: str) -> list[str]:
    text = re.sub(r"//[^\n]*", "", open(path).read())  # comments may mention DEV_GLOBAL
    return re.findall(r"DEV_GLOBAL\s+void\s+(?:DEV_LAUNCH_BOUNDS\([^()]*(?:\([^()]*\)[^()]*)*\)\s+)?(\w+)\s*\(", text)


def translation_unit(header: str) -> str:
    lines = [f'#include "cuda/{header}"']
    for k in KERNELS.get(header, []):
        for args in k.instances:
            first = args.split(",")[0].strip()
            params = NS + k.params.format(T=first)
            lines.append(f"template __global__ void {NS}{k.name}<{args}>({params});")
    return "\n".join(lines) + "\n"


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def parse_ptxas(log: str) -> dict[str, PtxasInfo]:
    infos: dict[str, PtxasInfo] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_90a'", line)
        if m:
            current = infos.setdefault(m.group(1), PtxasInfo())
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    return infos


def occupancy(regs: int, smem: int, block: int) -> float:
    """Theoretical occupancy (active warps / 64) of a kernel on one sm_90 multiprocessor."""
    warps = (block + 31) // 32
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = (SM90["regs"] // regs_per_warp) // warps
    by_threads = SM90["threads"] // block
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved_per_block"])
    blocks = min(by_regs, by_threads, by_smem, SM90["blocks"])
    return blocks * warps / SM90["warps"]


def sass_functions(sass: str) -> dict[str, list[str]]:
    funcs: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            current = funcs.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
    return funcs


INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def load_bytes(instr: str) -> int:
    """Bytes one thread reads with an LDG instruction (LDG.E.128 -> 16, LDG.E.U16 -> 2, ...)."""
    m = re.search(r"LDG\.E(?:\.\w+)*?\.(128|64|U16|S16|U8|S8)\b", instr)
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}.get(m.group(1), 4) if m else 4


def main_loop_loads(lines: list[str]) -> tuple[int, int] | None:
    """(128-bit loads, narrower loads) of global memory in the main loop: the loop (backward
    branch) whose body reads the most bytes per iteration; the innermost such one on ties."""
    instrs = []
    for line in lines:
        m = INSTR.search(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in instrs:
        b = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            loops.append((int(b.group(1), 16), addr))
    best = None
    for lo, hi in loops:
        loads = [t for a, t in instrs if lo <= a <= hi and re.search(r"\bLDG\.", t)]
        wide = sum(1 for t in loads if ".128" in t)
        key = (sum(load_bytes(t) for t in loads), -(hi - lo))
        if loads and (best is None or key > best[0]):
            best = (key, (wide, len(loads) - wide))
    return None if best is None else best[1]


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    pretty = out.stdout.splitlines()
    return {n: re.sub(r"^void rlhf_engine::kernels::", "", p.split("(")[0]) for n, p in zip(names, pretty)}


def check_header(path: str, nvcc: str, cuobjdump: str, nvdisasm_dir: str, workdir: str) -> tuple[list[Row], list[str]]:
    header = os.path.basename(path)
    problems: list[str] = []
    declared = kernels_declared(path)
    table = {k.name: k for k in KERNELS.get(header, [])}
    for name in declared:
        if name not in table:
            problems.append(f"{header}: kernel {name} has no instantiation entry in csrc/tools/cuda_check.py KERNELS")
    stem = os.path.join(workdir, header.replace(".", "_"))
    with open(stem + ".cu", "w") as f:
        f.write(translation_unit(header))
    r80 = run([nvcc, *NVCC_FLAGS, ARCH_80, "-c", stem + ".cu", "-o", stem + "_80.o"])
    if r80.returncode != 0:
        problems.append(f"{header}: nvcc sm_80 failed:\n{r80.stderr.strip()}")
    r90 = run([nvcc, *NVCC_FLAGS, ARCH_90A, "-Xptxas", "-v", "-cubin", stem + ".cu", "-o", stem + "_90a.cubin"])
    if r90.returncode != 0:
        problems.append(f"{header}: nvcc sm_90a failed:\n{r90.stderr.strip()}")
        return [], problems
    infos = parse_ptxas(r90.stderr + r90.stdout)
    env = dict(os.environ, PATH=nvdisasm_dir + os.pathsep + os.environ.get("PATH", ""))
    sass = run([cuobjdump, "-sass", stem + "_90a.cubin"], env=env)
    if sass.returncode != 0:
        problems.append(f"{header}: cuobjdump -sass failed: {sass.stderr.strip()}")
    funcs = sass_functions(sass.stdout)
    names = demangle(sorted(infos))
    rows = []
    for mangled in sorted(infos, key=lambda n: names[n]):
        info = infos[mangled]
        pretty = names[mangled]
        kernel = next((k for k in table.values() if pretty.startswith(k.name + "<")), None)
        block = kernel.block if kernel else 256
        row = Row(header, pretty, block, info, occupancy(info.registers, info.smem, block))
        if info.spill_stores or info.spill_loads:
            row.problems.append(f"spills {info.spill_stores} B stored / {info.spill_loads} B loaded")
        if kernel and kernel.vec128:
            loads = main_loop_loads(funcs.get(mangled, []))
            if loads is None:
                row.problems.append("no main loop with global loads found in SASS")
            else:
                wide, narrow = loads
                row.loop_loads = f"{wide}x128b" + (f"+{narrow}" if narrow else "")
                if wide == 0:
                    row.problems.append("main loop has no 128-bit global loads (LDG.E.128)")
        rows.append(row)
    return rows, problems


def check_launchers(nvcc: str, workdir: str) -> list[str]:
    """Compiles each csrc/cuda/*.cu to an object file with the torch headers; returns problems."""
    import sysconfig

    import torch.utils.cpp_extension as ext

    stub = os.path.join(workdir, "stub")
    os.makedirs(os.path.join(stub, "c10", "cuda", "impl"), exist_ok=True)
    with open(os.path.join(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [stub, CSRC, *ext.include_paths(), sysconfig.get_paths()["include"]]
    problems = []
    for src in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))):
        obj = os.path.join(workdir, os.path.basename(src) + ".o")
        cmd = [nvcc, *NVCC_FLAGS, "-DRLHF_ENGINE_CUDA", ARCH_90A, "-D_GLIBCXX_USE_CXX11_ABI=1", "-w"]
        cmd += [f"-I{i}" for i in includes] + ["-c", src, "-o", obj]
        r = run(cmd)
        status = "ok" if r.returncode == 0 else "FAILED"
        print(f"  launcher {os.path.relpath(src, ROOT)} with torch headers: {status}")
        if r.returncode != 0:
            problems.append(f"{os.path.basename(src)}: nvcc with torch headers failed:\n{r.stderr.strip()[-3000:]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the generated .cu/.cubin files and print where")
    parser.add_argument("--launchers", action="store_true", help="also compile csrc/cuda/*.cu with the torch headers")
    parser.add_argument(
        "--skip-without-nvcc", action="store_true", help="exit 0 with a note when nvcc is absent (for `make test`)"
    )
    args = parser.parse_args()
    if args.skip_without_nvcc and not nvcc_candidates():
        print(
            "cuda-check SKIPPED: nvcc not found (neither on PATH nor in $CUDA_HOME/bin); "
            "the CUDA kernel headers were not compiled. Install the CUDA toolkit to run this check."
        )
        return 0
    nvcc = find_nvcc()
    cuobjdump, nvdisasm_dir = find_cuobjdump()
    headers = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cuh")))
    if not headers:
        print("cuda-check: no csrc/cuda/*.cuh found", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="cuda_check_")
    problems: list[str] = []
    rows: list[Row] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for r, p in pool.map(lambda h: check_header(h, nvcc, cuobjdump, nvdisasm_dir, workdir), headers):
            rows += r
            problems += p
    print(f"cuda-check: {len(headers)} headers compiled with {nvcc} for sm_80 and sm_90a; ptxas -v and SASS for sm_90a")
    print(f"  headers: {', '.join(os.path.basename(h) for h in headers)}")
    width = max((len(r.kernel) for r in rows), default=10)
    print(f"  {'kernel':<{width}}  regs  smem(B)  stack  spill(st/ld)  block  occupancy  main-loop loads")
    for r in rows:
        i = r.info
        flag = "  FAIL: " + "; ".join(r.problems) if r.problems else ""
        print(
            f"  {r.kernel:<{width}}  {i.registers:>4}  {i.smem:>7}  {i.stack:>5}  {i.spill_stores:>5}/{i.spill_loads:<6}"
            f"  {r.block:>5}  {r.occupancy:>8.0%}  {r.loop_loads:<15}{flag}"
        )
        problems += [f"{r.kernel}: {p}" for p in r.problems]
    if args.launchers:
        problems += check_launchers(nvcc, workdir)
    if args.keep:
        print(f"  generated files kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        print(f"cuda-check FAILED ({len(problems)} problems):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"cuda-check OK: {len(rows)} kernels, no spills, 128-bit loads in every row kernel's main loop"
          + (", launchers compile" if args.launchers else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
