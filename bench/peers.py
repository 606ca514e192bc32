"""darkroom against its peers, in one run on one machine: the same random-weight SD-1.5-shaped (and BK-SDM-small-
shaped) model, 20 steps of PNDM with classifier-free guidance (7.5), one image at a time.

Run: make bench-peers   (builds bench/.venv-peers, then runs this with the defaults below)
     .venv/bin/python bench/peers.py --models sd15 --sizes 256 --runs 3 --warmup 1 [--only darkroom,genai,...]

Runners, each in its own process (its peak RSS is that process tree's, from os.wait4):
  darkroom        darkroom's pipeline in-process, and through the queue (embedded Redis, one warm `darkroom
                  worker`), image by image, interleaved; the queue's overhead is the median paired difference
  darkroom-int8   darkroom's pipeline on its INT8 artifact (workers/calibrate/quantize.py's recipe)
  diffusers-fp32  diffusers' StableDiffusionPipeline on PyTorch, FP32
  diffusers-bf16  the same under torch.autocast(bfloat16)
  optimum         optimum-intel's OVStableDiffusionPipeline, static reshape + compile (peers' venv)
  genai           openvino-genai's Text2ImagePipeline, static reshape + compile (peers' venv)
Per image: wall time of one generate call; per UNet step: wall time of one UNet call (batch 2), over every step
of the timed images. UNet FLOPs come from torch's FlopCounterMode; the matmul peaks from one large MatMul on
OpenVINO (and torch for bf16); "% of peak" = FLOPs / median step time / peak of the runner's precision.
Writes bench/results/peers.json (after every runner, so a long run stopped half-way keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RUNNERS = ("darkroom", "darkroom-int8", "diffusers-fp32", "diffusers-bf16", "optimum", "genai")
PEER_RUNNERS = ("optimum", "genai")
PRECISION = {"darkroom": "bf16", "darkroom-queue": "bf16", "darkroom-int8": "int8", "diffusers-fp32": "fp32",
             "diffusers-bf16": "bf16", "optimum": "bf16", "genai": "bf16"}
PEERS = ("genai", "optimum", "diffusers-fp32", "diffusers-bf16")


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.result: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]) if not os.environ.get("BENCH_COMMAND")
            else os.environ["BENCH_COMMAND"],
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "peers_python")},
            "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
            "prepare": {}, "flops": {}, "runs": {}}
        if args.append and args.out.is_file():
            # Add this run's rows to an earlier run's file (e.g. a second run at another size, or a runner that
            # failed); rows this run measures replace the earlier ones.
            earlier = json.loads(args.out.read_text(encoding="utf-8"))
            earlier.setdefault("appended", []).append({k: self.result[k] for k in ("command", "date", "settings")})
            self.result = earlier

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f}s] {message}", flush=True)

    def call(self, python: str, script: str, name: str, /, **params: Any) -> dict[str, Any]:
        """One runner in its own process; its result, plus the peak RSS of its process tree."""
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = Path(handle.name)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONWARNINGS": "ignore"}
        started = time.perf_counter()
        process = subprocess.Popen([python, str(BENCH / script), name, json.dumps(params), str(out)], env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            out.unlink(missing_ok=True)
            raise RuntimeError(f"runner {name} exited with {process.returncode}")
        result = json.loads(out.read_text(encoding="utf-8"))
        out.unlink()
        result["peak_rss_gb"] = round(usage.ru_maxrss / 1e6, 2)  # KiB on Linux: the tree's largest process
        result["process_s"] = round(time.perf_counter() - started, 1)
        return result

    def project(self, name: str, /, **params: Any) -> dict[str, Any]:
        return self.call(sys.executable, "runners.py", name, **params)

    def peers(self, name: str, /, **params: Any) -> dict[str, Any]:
        return self.call(self.args.peers_python, "peers_runner.py", name, **params)

    def save(self) -> None:
        self.result["total_s"] = round(time.perf_counter() - self.started, 1)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.result, indent=2) + "\n", encoding="utf-8")

    def run(self) -> None:
        args = self.args
        timing = {"runs": args.runs, "warmup": args.warmup, "warmup_steps": args.warmup_steps, "steps": args.steps}
        if "matmul" not in args.skip:
            self.say("matmul peaks ...")
            matmul = self.project("matmul", n=args.matmul_n, reps=args.matmul_reps)
            earlier = self.result.get("matmul")
            if earlier:  # --append: a peak is the best seen, so keep the higher of the two runs' figures
                matmul["earlier"] = {k: v for k, v in earlier.items() if k != "earlier"}
                matmul["peak_gflops"] = {k: max(v, earlier["peak_gflops"].get(k, 0))
                                         for k, v in matmul["peak_gflops"].items()}
            self.result["matmul"] = matmul
            self.say(f"  {self.result['matmul']}")
        for model in args.models:
            self.prepare(model)
        for size_index, size in enumerate(args.sizes):
            for model in args.models:
                prep = self.result["prepare"][model]
                row: dict[str, Any] = self.result["runs"].setdefault(model, {}).setdefault(str(size), {})
                runs = args.diffusers_runs[min(size_index, len(args.diffusers_runs) - 1)]
                common = {**timing, "size": size}
                for runner in [r for r in RUNNERS if r in args.only]:
                    self.say(f"{model} {size}x{size}: {runner} ...")
                    try:
                        row.update(self.one(runner, prep, model, common, runs))
                    except (RuntimeError, KeyError) as exc:  # one failed runner leaves the others' numbers
                        self.say(f"  FAILED: {exc!r}")
                        row[runner] = {"error": repr(exc)}
                    self.say(f"  {runner}: {short(row.get(runner, {}))}")
                    self.save()
        self.result["summary"] = summarize(self.result)
        self.save()

    def prepare(self, model: str) -> None:
        """The model's folders, darkroom's IR and INT8 artifact, optimum's export and the FLOP count (each step
        kept in the work dir and reused by later runs); a failed step fails only the runners that need it."""
        args, work, wanted = self.args, self.args.work_dir, set(self.args.only)
        prep: dict[str, Any] = self.result["prepare"].setdefault(model, {})
        steps: list[tuple[str, bool, Any]] = [
            ("flops", True, lambda: self.project("flops", model=model, sizes=args.sizes)),
            ("source", bool(wanted - set(PEER_RUNNERS)), lambda: self.project(
                "build", out=str(work / f"{model}-seed{args.seed}"), model=model, seed=args.seed)),
            ("convert", bool(wanted & {"darkroom", "darkroom-int8"}), lambda: self.project(
                "convert", work=str(work / "darkroom"), source=prep["source"]["folder"], name=model)),
            ("calibrate", "darkroom-int8" in wanted, lambda: self.project(
                "calibrate", ir=prep["convert"]["ir"], out=str(work / "darkroom" / f"{model}-int8"),
                size=min(args.sizes), calib_steps=args.calib_steps, samples=args.calib_samples)),
            ("peer_source", bool(wanted & set(PEER_RUNNERS)), lambda: self.peers(
                "build", out=str(work / f"{model}-seed{args.seed}-peers"), model=model, seed=args.seed)),
            ("export", bool(wanted & set(PEER_RUNNERS)), lambda: self.peers(
                "export", source=prep["peer_source"]["folder"], out=str(work / f"{model}-optimum-ov"))),
        ]
        for name, needed, step in steps:
            if not needed:
                continue
            self.say(f"{model}: {name} ...")
            try:
                prep[name] = step()
            except (RuntimeError, KeyError) as exc:
                self.say(f"  FAILED: {exc!r}")
                prep[name] = {"error": repr(exc)}
            self.say(f"  {name}: {short_prep(prep[name])}")
            self.save()
        flops = prep.pop("flops")
        earlier = self.result["flops"].get(model, {}).get("unet_flops_batch2", {})
        if "unet_flops_batch2" in flops:
            flops["unet_flops_batch2"] = {**earlier, **flops["unet_flops_batch2"]}
        self.result["flops"][model] = flops

    def one(self, runner: str, prep: dict[str, Any], model: str, common: dict[str, Any],
            diffusers_runs: int) -> dict[str, Any]:
        work = str(self.args.work_dir / "darkroom")
        if runner == "darkroom":
            both = self.project("darkroom", ir=prep["convert"]["ir"], work=work, name=model,
                                queue="darkroom-queue" not in self.args.skip, **common)
            out = {"darkroom": {**both["inproc"], "process_peak_rss_gb": both["peak_rss_gb"]}}
            if "queue" in both:
                out["darkroom-queue"] = both["queue"]
            return out
        if runner == "darkroom-int8":
            return {runner: self.project(runner, ir=prep["calibrate"]["int8"], work=work, **common)}
        if runner.startswith("diffusers"):
            runs = dict(common, runs=min(common["runs"], diffusers_runs))
            return {runner: self.project(runner, source=prep["source"]["folder"], **runs)}
        return {runner: self.peers(runner, exported=prep["export"]["exported"], **common)}


def short_prep(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.items() if not isinstance(v, dict | list))


def short(entry: dict[str, Any]) -> str:
    keys = ("image_median_s", "unet_median_ms", "peak_rss_gb", "overhead_ms", "overhead_pct", "error")
    return ", ".join(f"{k}={entry[k]}" for k in keys if k in entry)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per model and size: darkroom's ratios to each peer, the queue overhead, and % of the matmul peak."""
    peaks = result.get("matmul", {}).get("peak_gflops", {})
    out: dict[str, Any] = {}
    for model, sizes in result["runs"].items():
        for size, row in sizes.items():
            flops = result["flops"].get(model, {}).get("unet_flops_batch2", {}).get(size)
            entry: dict[str, Any] = {}
            mine = row.get("darkroom", {}).get("image_median_s")
            for name, run in row.items():
                if "image_median_s" not in run:
                    continue
                if mine and name != "darkroom":
                    # > 1: darkroom in-process is that many times faster than this runner.
                    entry[f"{name}_over_darkroom"] = round(run["image_median_s"] / mine, 3)
                step = run.get("unet_median_ms")
                peak = peaks.get(PRECISION.get(name, ""))
                if flops and step and peak:
                    run["unet_tflops"] = round(flops / (step / 1000) / 1e12, 3)
                    run["pct_of_peak"] = round(100 * flops / (step / 1000) / (peak * 1e9), 1)
            if "darkroom-queue" in row and "overhead_pct" in row["darkroom-queue"]:
                entry["queue_overhead_pct"] = row["darkroom-queue"]["overhead_pct"]
            if "genai_over_darkroom" in entry:
                entry["goal_le_genai"] = entry["genai_over_darkroom"] >= 1.0
            if "diffusers-fp32_over_darkroom" in entry:
                entry["goal_5x_diffusers_fp32"] = entry["diffusers-fp32_over_darkroom"] >= 5.0
            if "queue_overhead_pct" in entry:
                entry["goal_queue_le_1pct"] = entry["queue_overhead_pct"] <= 1.0
            out[f"{model} {size}"] = entry
    return out


def print_table(result: dict[str, Any]) -> None:
    mm = result.get("matmul", {})
    if mm:
        print(f"\nmatmul peak GFLOP/s on {mm.get('cpu')} ({result['machine']['cores']} cores): "
              + ", ".join(f"{k} {v}" for k, v in mm["peak_gflops"].items()))
    for model, sizes in result["runs"].items():
        for size, row in sizes.items():
            print(f"\n{model} {size}x{size}, {result['settings']['steps']} steps, CFG {7.5}")
            print(f"{'runner':<16}{'s/image':>9}{'ms/step':>9}{'vs darkroom':>12}{'% peak':>8}{'peak RSS':>10}")
            mine = row.get("darkroom", {}).get("image_median_s")
            for name, run in row.items():
                if "image_median_s" not in run:
                    print(f"{name:<16}  {run.get('error', 'no result')}")
                    continue
                ratio = f"{run['image_median_s'] / mine:.2f}x" if mine else ""
                step = f"{run['unet_median_ms']:.0f}" if "unet_median_ms" in run else ""
                pct = f"{run['pct_of_peak']:.0f}%" if "pct_of_peak" in run else ""
                peak = run.get("peak_rss_gb") or run.get("process_peak_rss_gb")
                print(f"{name:<16}{run['image_median_s']:>9.2f}{step:>9}{ratio:>12}{pct:>8}{peak:>8} GB")
            queue = row.get("darkroom-queue", {})
            if "overhead_ms" in queue:
                print(f"queue overhead: {queue['overhead_ms']} ms per image = {queue['overhead_pct']} %")
    print("\n(vs darkroom: the runner's s/image over darkroom in-process's; > 1 means darkroom is faster)")


LABELS = {"darkroom": "darkroom, in-process", "darkroom-queue": "darkroom, through the queue (1 warm worker)",
          "darkroom-int8": "darkroom, INT8 artifact", "diffusers-fp32": "diffusers on PyTorch, FP32",
          "diffusers-bf16": "diffusers on PyTorch, bf16 autocast", "optimum": "optimum-intel OVStableDiffusionPipeline",
          "genai": "openvino-genai Text2ImagePipeline"}


def markdown(result: dict[str, Any]) -> str:
    """The README's table: one row per model, size and runner."""
    lines = ["| model | size | runner | s/image | ms/UNet step | vs darkroom | UNet GFLOP/s (% of peak) | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for model, sizes in result["runs"].items():
        for size, row in sizes.items():
            mine = row.get("darkroom", {}).get("image_median_s")
            for name, run in row.items():
                if "image_median_s" not in run:
                    continue
                ratio = f"{run['image_median_s'] / mine:.2f}x" if mine else ""
                step = f"{run['unet_median_ms']:.0f}" if "unet_median_ms" in run else ""
                pct = (f"{run['unet_tflops'] * 1000:.0f} ({run['pct_of_peak']:.0f} % of {PRECISION[name]})"
                       if "pct_of_peak" in run else "")
                peak = run.get("peak_rss_gb") or run.get("process_peak_rss_gb")
                extra = (f" ({run['overhead_ms']:+.0f} ms = {run['overhead_pct']:+.2f} %)" if "overhead_ms" in run
                         else "")
                lines.append(f"| {model} | {size} | {LABELS.get(name, name)} | {run['image_median_s']:.2f}{extra} "
                             f"| {step} | {ratio} | {pct} | {peak} GB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15", help="comma-separated: sd15, bksdm-small, tiny")
    parser.add_argument("--sizes", default="256", help="image sizes, comma-separated (e.g. 256,512)")
    parser.add_argument("--runs", type=int, default=3, help="timed images per runner")
    parser.add_argument("--diffusers-runs", default="2,1",
                        help="at most this many timed images for diffusers (slow), per size in order")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up images per runner")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of a warm-up image")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=",".join(RUNNERS), help=f"runners, comma-separated: {','.join(RUNNERS)}")
    parser.add_argument("--skip", default="", help="also skippable: darkroom-queue, matmul")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--calib-samples", type=int, default=4, help="UNet calls nncf.quantize calibrates on")
    parser.add_argument("--calib-steps", type=int, default=4, help="steps per calibration prompt (2 prompts)")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--matmul-reps", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=BENCH / ".work",
                        help="models, IRs and storage, kept and reused by later runs")
    parser.add_argument("--peers-python", default=str(BENCH / ".venv-peers" / "bin" / "python"))
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "peers.json")
    parser.add_argument("--append", action="store_true", help="add to the results already in --out")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: print the tables (and a Markdown one) from --out")
    args = parser.parse_args()
    if args.report:
        result = json.loads(args.out.read_text(encoding="utf-8"))
        result["summary"] = summarize(result)
        print_table(result)
        print("\n" + markdown(result))
        print(json.dumps(result["summary"], indent=1))
        return 0
    args.models = [m for m in args.models.split(",") if m]
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.diffusers_runs = [int(n) for n in args.diffusers_runs.split(",") if n]
    args.only = [r for r in args.only.split(",") if r]
    args.skip = [r for r in args.skip.split(",") if r]
    unknown = set(args.only) - set(RUNNERS)
    if unknown:
        parser.error(f"unknown runner(s) {', '.join(sorted(unknown))}; choose from {', '.join(RUNNERS)}")
    if set(args.only) & set(PEER_RUNNERS) and not Path(args.peers_python).is_file():
        parser.error(f"{args.peers_python} not found: `make bench-peers-venv` builds the peers' venv")
    harness = Harness(args)
    harness.run()
    print_table(harness.result)
    harness.say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
