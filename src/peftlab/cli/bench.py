"""peftlab bench --scenario NAME [--output-dir DIR]: peftlab vs the Trainer + PEFT baseline, same run."""
from __future__ import annotations

from pathlib import Path

from peftlab.cli._checks import output_dir as checked_dir, positive_float, positive_int
from peftlab.errors import UserError


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark the training path against the Trainer + PEFT baseline",
                       description="Runs, in one invocation, `peftlab train` and the reference baseline "
                       "(../shared/bench/hf_trainer_baseline.py, --style seed and --style tuned) on the same "
                       "model, rows, hyper-parameters and steps, and writes <output-dir>/<scenario>.json. "
                       "See docs/benchmarks.md.")
    p.add_argument("--scenario", help="scenario name (see --list)")
    p.add_argument("--scenarios", metavar="FILE", help="scenarios file (default bench/scenarios.yaml)")
    p.add_argument("--output-dir", help="where NAME.json goes (default: results/ beside the scenarios file)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--repeats", type=positive_int, help="run every contender this many times (rotated order; medians)")
    p.add_argument("--only", help="comma-separated contenders to run, e.g. peftlab,tuned (ratios need seed/tuned)")
    p.add_argument("--threads", type=positive_int, help="OMP_NUM_THREADS for every contender (default: torch's own choice)")
    p.add_argument("--max-train", type=positive_int, help="override the scenario's training rows (quick checks)")
    p.add_argument("--max-test", type=positive_int, help="override the scenario's test rows (quick checks)")
    p.add_argument("--peak-tflops", type=positive_float, help="the GPU's dense bf16 peak, when the built-in table lacks it")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary data, logs and run directories")
    p.add_argument("--part", action="append", help="run only this part of the scenario (repeatable)")
    p.add_argument("--timeout", type=positive_float, help="seconds each contender may run (killed after; recorded as failed)")
    p.add_argument("--append", metavar="FILE", help="append each contender's result to this JSON Lines file as it finishes")
    return p


def run(args) -> int:
    from peftlab.bench import scenarios
    from peftlab.bench.runner import run_scenario

    source = Path(args.scenarios) if args.scenarios else scenarios.default_scenarios_file()
    if args.list:
        tree = scenarios.read_file(source)
        for name, spec in tree["scenarios"].items():
            print(f"{name:<12} {(spec or {}).get('device', '?'):<5} {(spec or {}).get('description', '')}")
        return 0
    if not args.scenario:
        raise UserError(f"--scenario is required (one of: {', '.join(scenarios.names(source))})")
    for flag in ("repeats", "threads", "max_train", "max_test"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    scenario = scenarios.load(args.scenario, source)
    output_dir = checked_dir(args.output_dir, "--output-dir") if args.output_dir else source.parent / "results"
    only = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    result = run_scenario(scenario, output_dir, repeats=args.repeats, only=only, threads=args.threads,
                          max_train=args.max_train, max_test=args.max_test, keep_work=args.keep_work,
                          peak_tflops=args.peak_tflops, parts=args.part, timeout_s=args.timeout, append=args.append)
    print(summary(result))
    print(f"results: {result['path']}")
    failed = [f"{p['name']}/{n}" for p in result["parts"] for n, c in p["contenders"].items() if not c.get("ok")]
    if failed:
        print(f"failed contenders: {', '.join(failed)}")
        return 1
    return 0


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary(result: dict) -> str:
    from peftlab.bench.runner import peaks_line

    lines = [f"scenario {result['scenario']} on {result['device']} "
             f"(load before/after {result['host']['load_average_before']} / {result['host']['load_average_after']})"]
    cpu = result["host"].get("matmul_peak_flops")
    if cpu:
        lines.append(f"  {peaks_line(cpu)}")
    for part in result["parts"]:
        lines.append(f"  part {part['name']}: {part['model']}, {part['data']['train_rows']:,} train rows x "
                     f"{part['settings']['epochs']} epoch(s), {part['data']['test_rows']:,} test rows")
        chance = part.get("all_at_chance")
        # on a CPU, instead of MFU: the share of the measured fp32 and bf16 matmul peaks
        shares = cpu is not None
        lines.append(f"    {'contender':<16}{'real tok/s':>12}{'samples/s':>11}{'peak MiB':>10}{'test acc':>10}"
                     f"{'macro-F1':>10}" + (f"{'%fp32pk':>9}{'%bf16pk':>9}" if shares else f"{'MFU':>8}")
                     + f"{'vs seed':>9}{'vs tuned':>9}{'vs fp32':>9}  precision, engine")
        for name, c in part["contenders"].items():
            if not c.get("ok"):
                lines.append(f"    {name:<16}FAILED")
                continue
            r = part["ratios"].get(name, {})
            mem = c["peak_memory_bytes"] / 2**20 if c["peak_memory_bytes"] else None
            lines.append(f"    {name:<16}{_fmt(c['real_tokens_per_second'], ',.0f'):>12}{_fmt(c['samples_per_second'], ',.1f'):>11}"
                         f"{_fmt(mem, ',.0f'):>10}{_fmt(c['test_accuracy'], '.4f'):>10}{_fmt(c['test_macro_f1'], '.4f'):>10}"
                         + (f"{_fmt(c.get('share_of_fp32_peak'), '.1%'):>9}{_fmt(c.get('share_of_bf16_peak'), '.1%'):>9}"
                            if shares else f"{_fmt(c['mfu'], '.1%'):>8}")
                         + f"{_ratio_text(r.get('ratio_vs_seed'), chance):>9}{_ratio_text(r.get('ratio_vs_tuned'), chance):>9}"
                         f"{_ratio_text(r.get('ratio_vs_fp32'), chance):>9}  {c.get('precision') or '?'}, {_engine(c)}")
        if chance:
            lines.append(f"    every contender sits at chance (test accuracy <= {part['data']['chance_accuracy']:.4f} + 0.02): "
                         f"nothing was learnt, so the speed ratios are not a result")
    return "\n".join(lines)


def _ratio_text(value, at_chance: bool) -> str:
    if value is None:
        return "-"
    return f"({value:.2f})" if at_chance else f"{value:.2f}"  # in brackets: runs that learnt nothing


def _engine(c: dict) -> str:
    if c.get("kind") != "peftlab":
        return "transformers Trainer"
    q = c.get("quantization") or {}
    quant = f", {q.get('used')} ({q.get('modules_4bit') or q.get('modules_8bit') or 0} layers)" if q.get("requested") else ""
    fell = " (fell back)" if c.get("step_engine_reason") else ""
    return f"{c.get('step_engine') or '?'}{fell}{quant}"
