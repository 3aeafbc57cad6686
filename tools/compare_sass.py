"""Compare the SASS two checkouts of moegemm generate for the FP8 GEMM configs.

A refactor of the device code must not change the machine code: this builds every config in each
checkout (each with its own kernel cache), disassembles the cubins and reports per config whether
the SASS is identical, the registers and spills of both, the instruction-count delta and a short
diff excerpt where they differ.

    git worktree add ../base <commit>
    python tools/compare_sass.py --base ../base --new . [--configs NAME ...] [--quick] [-j 2]

The config list is the FP8 one tests/test_gemm_sass.py compiles (``_fp8_configs``: every config the host
heuristics emit plus the GPU tests' explicit ones), taken from the new checkout; ``--quick`` takes a
handful of representative ones, ``--configs`` names kernels (``fp8_gemm.kernel_name``) or substrings
of them. Each checkout is built in a subprocess that imports that checkout's package. Only the
disassembly's header lines (blank lines, the ``code for``/``.target``/``Fatbin`` lines) are dropped
before comparing: instructions, their encodings, addresses and the ``.headerflags`` line stay.
Exit status: 0 when every config is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Representative configs for fast iteration: dense 128 x 128 and 192 x 128, a split-K one, a CTA pair
# with masked experts, the contiguous and psum kinds, masked with three warpgroups, fp32 accumulate.
QUICK = (
    "sm90_fp8_gemm_nt_bf16_m128n128s5",
    "sm90_fp8_gemm_nt_bf16_m192n128s4",
    "sm90_fp8_gemm_nt_bf16_m64n96s10k4",
    "sm90_fp8_gemm_nt_masked_bf16_m128n128s5cm2",
    "sm90_fp8_gemm_nt_contiguous_bf16_m128n128s5",
    "sm90_fp8_gemm_nt_psum_bf16_m64n128s5",
    "sm90_fp8_gemm_nt_masked_bf16_m192n128s4",
    "sm90_fp8_gemm_nt_f32_acc_m128n128s4k2",
)

_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_HEADER = re.compile(r"^\s*(code for sm_\w+|\.target\s|Fatbin \w+ code:|=+\s*$|arch = |code version = |host = |"
                     r"compile_size = |identifier = )")
_WARNING = re.compile(r"\((C751[0-9])\)[^\n]*")


def normalize(sass: str, cubin_path: str = "") -> list[str]:
    """The disassembly without its header lines (and without any line naming the cubin file)."""
    lines = []
    for line in sass.splitlines():
        if not line.strip() or _HEADER.match(line) or (cubin_path and cubin_path in line):
            continue
        lines.append(line.rstrip())
    return lines


def instructions(lines: list[str]) -> list[str]:
    return [m.group(1) for m in map(_INSTRUCTION.match, lines) if m]


# ---- worker: runs inside one checkout ------------------------------------------------------------------


def _worker(out_dir: Path, jobs: int) -> None:
    from moegemm.jit import compiler
    from moegemm.kernels import fp8_gemm

    configs = []
    for item in json.load(sys.stdin):
        fields = item["fields"]
        if hasattr(fp8_gemm, "GemmType"):  # checkouts since the GemmType enum; before, the kind's name
            fields["gemm_type"] = fp8_gemm.GemmType[fields["gemm_type"].upper()]
        configs.append((item["name"], fp8_gemm.Fp8GemmConfig(**fields)))

    def one(named) -> str:
        name, config = named  # the new checkout's name, so that both sides' files match
        try:
            build = fp8_gemm.build(config)
            sass = compiler.disassemble(build.cubin_path)
            report = build.resources()
            result = {"registers": report.registers, "spill_stores": report.spill_stores,
                      "spill_loads": report.spill_loads, "stack_bytes": report.stack_bytes,
                      "warnings": [m.group(0) for m in _WARNING.finditer(build.log)],
                      "cubin": str(build.cubin_path)}
            (out_dir / f"{name}.sass").write_text(sass)
        except Exception as error:  # reported per config by the parent
            result = {"error": f"{type(error).__name__}: {error}"}
        (out_dir / f"{name}.json").write_text(json.dumps(result))
        return name

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for done, name in enumerate(pool.map(one, configs), 1):
            print(f"  [{done}/{len(configs)}] {name}", file=sys.stderr, flush=True)


# ---- driver --------------------------------------------------------------------------------------------


def _config_list(checkout: Path) -> list:
    sys.path[:0] = [str(checkout), str(checkout / "tests")]
    from test_gemm_sass import _fp8_configs  # noqa: PLC0415 (needs the checkout on sys.path)

    return _fp8_configs()


def _fields(config) -> dict:
    """A config as JSON: its fields, the GemmType by its lower-case name. Fields at their defaults are
    left out, so that a checkout older than a field builds the configs that do not use it."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.default is dataclasses.MISSING or getattr(config, f.name) != f.default}
    fields["gemm_type"] = config.gemm_type.name.lower()
    return fields


def _build_all(label: str, checkout: Path, configs: list, cache: Path, out_dir: Path, jobs: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(checkout), MOEGEMM_CACHE_DIR=str(cache))
    for name in ("MOEGEMM_NVCC_FLAGS", "MOEGEMM_USE_NVRTC", "MOEGEMM_JIT_DEBUG", "MOEGEMM_DUMP_SASS"):
        env.pop(name, None)
    print(f"{label}: building {len(configs)} configs in {checkout} (cache {cache})", file=sys.stderr, flush=True)
    from moegemm.kernels import fp8_gemm

    payload = json.dumps([{"name": fp8_gemm.kernel_name(c), "fields": _fields(c)} for c in configs])
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(out_dir), "-j", str(jobs)],
                   input=payload, text=True, env=env, cwd=checkout, check=True)


def _compare(name: str, base_dir: Path, new_dir: Path, context: int) -> dict:
    base = json.loads((base_dir / f"{name}.json").read_text())
    new = json.loads((new_dir / f"{name}.json").read_text())
    row = {"name": name, "base": base, "new": new}
    if "error" in base or "error" in new:
        row["identical"] = False
        return row
    base_lines = normalize((base_dir / f"{name}.sass").read_text(), base["cubin"])
    new_lines = normalize((new_dir / f"{name}.sass").read_text(), new["cubin"])
    row["identical"] = base_lines == new_lines
    row["instructions"] = (len(instructions(base_lines)), len(instructions(new_lines)))
    if not row["identical"]:
        diff = difflib.unified_diff(instructions(base_lines), instructions(new_lines), "base", "new", n=context,
                                    lineterm="")
        row["diff"] = list(diff)
    return row


def _resources(side: dict) -> str:
    if "error" in side:
        return "ERROR"
    spills = side["spill_stores"] + side["spill_loads"] + side["stack_bytes"]
    return f"{side['registers']} regs" + (f", {spills} B spill/stack" if spills else "") + (
        f", {len(side['warnings'])} C751x" if side["warnings"] else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help="the reference checkout")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout under test (default: this one)")
    parser.add_argument("--configs", nargs="*", help="kernel names (or substrings) to compare")
    parser.add_argument("--quick", action="store_true", help="only a few representative configs")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="parallel compiles per checkout (default 2)")
    parser.add_argument("--work-dir", type=Path, help="caches and disassemblies (default: a temporary dir)")
    parser.add_argument("--diff-lines", type=int, default=12, help="diff lines shown per differing config")
    parser.add_argument("--context", type=int, default=2, help="context lines of the diffs")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.jobs)
        return 0
    if args.base is None:
        parser.error("--base is required")
    base, new = args.base.resolve(), args.new.resolve()

    configs = _config_list(new)
    from moegemm.kernels import fp8_gemm

    names = {fp8_gemm.kernel_name(c): c for c in configs}
    wanted = list(args.configs or []) + (list(QUICK) if args.quick else [])
    if wanted:
        configs = [c for name, c in names.items() if any(w == name for w in wanted)] or \
                  [c for name, c in names.items() if any(w in name for w in wanted)]
        if not configs:
            parser.error(f"no config matches {wanted}")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="compare-sass-"))
    for label, checkout in (("base", base), ("new", new)):
        _build_all(label, checkout, configs, work / f"cache-{label}", work / f"sass-{label}", args.jobs)

    rows = [_compare(fp8_gemm.kernel_name(c), work / "sass-base", work / "sass-new", args.context) for c in configs]
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        status = "identical" if row["identical"] else "DIFFERENT"
        counts = row.get("instructions")
        delta = f"instructions {counts[0]} -> {counts[1]} ({counts[1] - counts[0]:+d})" if counts else ""
        print(f"{row['name']:<{width}}  {status:<9}  base {_resources(row['base'])}, new {_resources(row['new'])}"
              f"  {delta}")
        for side in ("base", "new"):
            if "error" in row[side]:
                print(f"    {side}: {row[side]['error'][:2000]}")
        for line in row.get("diff", [])[: args.diff_lines]:
            print(f"    {line}")
    same = sum(r["identical"] for r in rows)
    print(f"\n{same} of {len(rows)} configs identical, {len(rows) - same} different (work dir: {work})")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
