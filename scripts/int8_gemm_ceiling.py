"""How much faster int8 matmuls are than float32 ones on this CPU, at NomicBERT's projection shapes: the
ceiling on what an int8 variant can gain over fp32, since the projections are nearly all of the model's compute.

    .venv/bin/python -m scripts.int8_gemm_ceiling [--tokens 256] [--repeats 20] [--isa native,avx2,avx2_vnni]

Per instruction-set mode (each in a process of its own, the modes in turns): float32 `F.linear` (torch's
BLAS), fbgemm's dynamic int8 Linear as the library runs it (`int8-dynamic`'s kernel, one activation range per
call), the int8-token variant's fbgemm kernel (each token on its own range) and, where the CPU has int8 dot
products, its compiled `torch._int_mm` kernel. `avx2` restricts every library to AVX2 (ATEN_CPU_CAPABILITY,
MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, FBGEMM_ENABLE_INSTRUCTIONS): an emulation of an AVX2-only CPU on
a newer one, whose AVX2 units need not match the older CPUs'; an AVX2 host's own figures settle it.
`avx2_vnni` is the same but lets oneDNN use AVX-VNNI, the 256-bit int8 dot product of CPUs without AVX-512
(Intel's since Alder Lake): `int_mm` runs there, and this measures what it gains on such a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from server.model import int8
from server.model.device import cpu_flags, speed_flags

# NomicBERT v1.5's projections, [in, out] (hidden 768, SwiGLU inner 3072): Wqkv, out_proj, fc11, fc12, fc2.
SHAPES = ((768, 2304), (768, 768), (768, 3072), (768, 3072), (3072, 768))
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
ISA_ENV = {"native": {}, "avx2": AVX2_ENV, "avx2_vnni": {**AVX2_ENV, "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}}
# The modes whose CPU has an int8 dot product for `int_mm` (this CPU's own flags decide for native).
INT_MM_ISAS = ("native", "avx2_vnni")


def _best(run: Callable[[], object], repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def _measure(tokens: int, repeats: int, with_int_mm: bool) -> dict[str, float]:
    """Seconds for one pass over every projection, per method (the fastest of `repeats`)."""
    torch.manual_seed(0)
    layers = [nn.Linear(i, o) for i, o in SHAPES]
    inputs = [torch.randn(tokens, i) for i, _ in SHAPES]
    fbgemm = [int8.Int8Linear(layer, None, kernel="fbgemm") for layer in layers]
    dynamic = [torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)
               for layer in layers]
    methods: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
        "fp32": list(layers), "fbgemm, one range per call (int8-dynamic)": list(dynamic),
        "fbgemm, per token (int8-token)": list(fbgemm)}
    if with_int_mm:
        token = [int8.Int8Linear(layer, None, kernel="int_mm") for layer in layers]
        int8.compile_kernels(token)
        methods["int_mm, per token, compiled (int8-token)"] = list(token)
    seconds = {}
    with torch.inference_mode():
        for name, modules in methods.items():
            seconds[name] = _best(lambda m=modules: [f(x) for f, x in zip(m, inputs, strict=True)], repeats)
    return seconds


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    with_int_mm = int8.kernel_for(cpu_flags()) == "int_mm" and args.isa in INT_MM_ISAS
    result = {"capability": torch.backends.cpu.get_cpu_capability(),
              "seconds": _measure(args.tokens, args.repeats, with_int_mm)}
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256, help="rows of each matmul (a batch's tokens)")
    p.add_argument("--repeats", type=int, default=20, help="passes per method and round; the fastest counts")
    p.add_argument("--rounds", type=int, default=2, help="turns of every mode")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--isa", default="native,avx2", help=f"modes, of {', '.join(ISA_ENV)}: native is what the CPU has")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    unknown = [isa for isa in args.isa.split(",") if isa not in ISA_ENV]
    if unknown:
        p.error(f"--isa: unknown mode {unknown[0]!r}; expected some of {', '.join(ISA_ENV)}")
    flops = 2 * args.tokens * sum(i * o for i, o in SHAPES)
    print(f"CPU flags: {speed_flags()}; {args.threads} threads; {args.tokens} tokens through NomicBERT's five "
          f"projections ({flops / 1e9:.2f} GFLOP per pass)")
    for round_ in range(1, args.rounds + 1):
        for isa in args.isa.split(","):
            env = {**os.environ, **ISA_ENV[isa]}
            out = subprocess.run([sys.executable, "-m", "scripts.int8_gemm_ceiling", "--child", "--isa", isa,
                                  "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                                  "--threads", str(args.threads)], env=env, capture_output=True, text=True,
                                 check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            seconds = result["seconds"]
            print(f"\nround {round_}, {isa} (aten capability {result['capability']}):")
            print(f"  {'method':<44} {'GFLOP/s':>8} {'x fp32':>7}")
            for name, s in seconds.items():
                print(f"  {name:<44} {flops / s / 1e9:>8.1f} {seconds['fp32'] / s:>7.2f}")


if __name__ == "__main__":
    main()
