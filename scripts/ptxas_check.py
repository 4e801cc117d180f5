"""Resource check of the CUDA kernels from `nvcc -Xptxas -v` (scripts/nvcc_check.sh runs it after compiling).

For every kernel and architecture: registers, spill stores/loads, stack frame and static shared memory, against the
kernel's launch bounds (`.maxntid` in the PTX that nvcc kept). Fails on any spill not listed in KNOWN_SPILLS with
exactly its size (a new spill, or a known one that grew), on registers × bound > 64 Ki and on static shared memory
over 48 KiB. A kernel without __launch_bounds__ is reported with the largest block its registers allow.

    python scripts/ptxas_check.py KEEP_DIR...     (each KEEP_DIR: ptxas.log + the .ptx files of one nvcc -keep run)
"""
import glob
import os
import re
import subprocess
import sys

REGS_PER_SM = 65536
STATIC_SMEM_LIMIT = 48 * 1024
# Spills present when this check was added (CUDA 13.0, -O3), (store bytes, load bytes): the 16-byte-vector fp16/bf16
# NCHW statistics kernels on sm_90 only (sm_80 does not spill). Recorded so that CI fails on any other spill; remove an
# entry when the kernel is fixed.
KNOWN_SPILLS = {
    ("sm_90", "void gns::nchw_stats_kernel<__nv_bfloat16, 8, false>"): (4, 4),
    ("sm_90", "void gns::nchw_stats_kernel<__nv_bfloat16, 8, true>"): (16, 16),
    ("sm_90", "void gns::nchw_stats_kernel<__half, 8, false>"): (4, 4),
}

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
PTX_ENTRY = re.compile(r"^(?:\.visible\s+)?\.entry (\S+)\(")
MAXNTID = re.compile(r"^\.maxntid (\d+), (\d+), (\d+)")


def parse_log(path):
    """{(arch, mangled): {regs, smem, stack, spill_st, spill_ld}} from one ptxas -v log."""
    out, cur = {}, None
    with open(path) as f:
        for line in f:
            m = ENTRY.search(line)
            if m:
                cur = (m.group(2), m.group(1))
                out[cur] = {"regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0}
                continue
            if cur is None:
                continue
            m = PROPS.search(line)
            if m:
                out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            m = USED.search(line)
            if m:
                out[cur].update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


def parse_maxntid(keep_dir):
    """{mangled: threads} from the kept PTX (every architecture's PTX carries the same bounds)."""
    bounds = {}
    for ptx in glob.glob(os.path.join(keep_dir, "*.ptx")):
        name = None
        with open(ptx) as f:
            for line in f:
                m = PTX_ENTRY.match(line)
                if m:
                    name = m.group(1)
                    bounds.setdefault(name, None)
                    continue
                if name is not None:
                    m = MAXNTID.match(line)
                    if m:
                        bounds[name] = int(m.group(1)) * int(m.group(2)) * int(m.group(3))
                    elif line.startswith("{"):
                        name = None
    return bounds


def demangle(names):
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        out = r.stdout.splitlines()
        if len(out) == len(names):
            return [re.sub(r"\(anonymous namespace\)::|fastdiff::", "", n).split("(")[0] for n in out]
    except (OSError, subprocess.CalledProcessError):
        pass
    return names


def main(dirs):
    rows, bad = [], []
    for d in dirs:
        stats = parse_log(os.path.join(d, "ptxas.log"))
        bounds = parse_maxntid(d)
        if not stats:
            bad.append(f"{d}: no 'Compiling entry function' lines in ptxas.log (was -Xptxas -v passed?)")
        for (arch, name), s in sorted(stats.items()):
            rows.append((arch, name, s, bounds.get(name)))
    names = demangle([r[1] for r in rows])
    print(f"{'arch':6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6} {'bound':>5} {'fit':>6}  kernel")
    known = 0
    for (arch, name, s, bound), short in zip(rows, names):
        # blocks of `bound` threads the register file holds; without bounds: the largest block (warps of 32)
        per_block = s["regs"] * (bound or 0)
        fit = (REGS_PER_SM // per_block if per_block else 0) if bound else \
            (min(1024, REGS_PER_SM // max(s["regs"], 1)) // 32 * 32)
        print(f"{arch:6} {s['regs']:4d} {s['spill_st']:5d}/{s['spill_ld']:<5d} {s['stack']:5d} {s['smem']:6d} "
              f"{bound or '-':>5} {fit:>6}  {short}")
        spill = (s["spill_st"], s["spill_ld"])
        if spill != (0, 0):
            if KNOWN_SPILLS.get((arch, short)) == spill:
                known += 1
            else:
                bad.append(f"{arch} {short}: register spills ({spill[0]} bytes stored, {spill[1]} loaded)")
        if bound and per_block > REGS_PER_SM:
            bad.append(f"{arch} {short}: {s['regs']} registers x {bound} threads > {REGS_PER_SM}")
        if s["smem"] > STATIC_SMEM_LIMIT:
            bad.append(f"{arch} {short}: {s['smem']} bytes of static shared memory > {STATIC_SMEM_LIMIT}")
    print(f"ptxas_check: {len(rows)} kernel builds, {known} with a known spill (KNOWN_SPILLS); 'bound' is "
          f"__launch_bounds__; 'fit' = blocks of that size the register file holds, or without bounds the largest block")
    if bad:
        for b in bad:
            print("ptxas_check: FAIL " + b, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
