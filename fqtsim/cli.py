"""The `fqtsim` command line: training on the simulated device, closed-form costs, benchmarks.

    fqtsim run --hw hw_configs/npu.yaml --quantizer psq
    fqtsim cost --hw hw_configs/npu.yaml --gemm 128x784x512 [--gemm ...] [--quantizer ptq psq bhq]
    fqtsim report runs/A runs/B --model resnet50 --hw hw_configs/npu.yaml --out reports/NAME
    fqtsim bench

Every option is given at most once (only `cost --gemm` and `report --hw` repeat); `--hw` takes a
YAML path or the name of a shipped config (npu, npu-7nm, npu-acc24, dsp, mcu), and the default
hw_configs/npu.yaml is the shipped one when the current directory has no such file.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import shlex
import sys

import pandas as pd

from fqtsim.quantizers.storage import DEFAULT_BLOCK, MOMENTUM_FORMATS, WEIGHT_FORMATS
from fqtsim.simulation.schedule import METHODS, RANGE_POLICIES
from fqtsim.simulation.workloads import WORKLOADS
from fqtsim.training.train import Interrupted, RunConfig
from fqtsim.analysis.variance import DEFAULTS as VARIANCE_DEFAULTS, METHODS as VARIANCE_METHODS

DEFAULT_HW = "hw_configs/npu.yaml"


def parse_gemm(text: str) -> tuple[int, int, int]:
    """'MxKxN' -> (M, K, N): A is M x K, B is K x N."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip())
    if not match or 0 in (dims := tuple(int(g) for g in match.groups())):
        raise argparse.ArgumentTypeError(f"{text!r} is not MxKxN with positive integers, e.g. 128x784x512")
    return dims


def bits(text: str) -> int:
    if not text.isdigit() or not 2 <= int(text) <= 8:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer in 2..8")
    return int(text)


def int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in lo..hi (hi None: no upper bound)."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            allowed = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"got {text!r}; expected {allowed}")
        return value
    convert.__name__ = "integer"
    return convert


SEED = int_in(0, 2**32 - 1)    # numpy and torch take seeds of 0..2^32 - 1


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (not nan, inf or negative)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a finite number > 0")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless the help already names it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None
                or default is False or default is argparse.SUPPRESS or default == []):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class _Parser(argparse.ArgumentParser):
    """Defaults in the help; a usage error is one line (as every other error of the command),
    not the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _hw_help(default: str) -> str:
    from fqtsim.hardware.hw import shipped
    return (f"hardware config: a YAML file, or a shipped config by name ({', '.join(shipped())}); "
            f"default {default} (the shipped one when ./{default} does not exist)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fqtsim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cost = sub.add_parser("cost", help="closed-form bytes, ops, energy and cycles of GEMMs")
    cost.add_argument("--hw", default=DEFAULT_HW, help=_hw_help(DEFAULT_HW))
    cost.add_argument("--gemm", type=parse_gemm, action="append", metavar="MxKxN",
                      help="GEMM shape: A is M x K, B is K x N; repeat for several")
    cost.add_argument("--model", choices=sorted(WORKLOADS), metavar="MODEL",
                      help=f"instead of --gemm, a whole training step of a model "
                           f"({', '.join(sorted(WORKLOADS))}): with --quantizer, what each "
                           f"adds over delayed PTQ, with the quantizers riding the passes of the "
                           f"ops between the GEMMs and without")
    cost.add_argument("--batch", type=int_in(1), help="samples per step with --model (default 64)")
    cost.add_argument("--a-bits", type=bits, default=8,
                      help="A operand code bits (default 8; with --quantizer, --grad-bits is A's)")
    cost.add_argument("--b-bits", type=bits, default=8, help="B operand code bits (default 8)")
    cost.add_argument("--out-bits", type=bits, default=8, help="output code bits (default 8)")
    cost.add_argument("--writeback", choices=["fused", "materialized"], default="fused",
                      help="requantize in the output pipeline, or write accumulator-width results "
                           "(with --quantizer, the quantizer decides)")
    cost.add_argument("--scope", choices=["tensor", "rows"], default="tensor",
                      help="range scope a materialized output is held for (default tensor)")
    cost.add_argument("--quantizer", nargs="+", choices=METHODS, metavar="Q",
                      help="gradient quantizers (ptq psq bhq mxint hadamard): show what each adds to the GEMM "
                           "dX = Q(dY) W, with dY the M x K operand, over the fused baseline "
                           "(dY's codes made in its producer's pipeline from a range known "
                           "beforehand, as delayed PTQ does)")
    cost.add_argument("--range", nargs="+", choices=RANGE_POLICIES, default=["dynamic"],
                      dest="range_policy", metavar="R",
                      help="range policies with --quantizer: dynamic (default), delayed, predicted")
    cost.add_argument("--grad-bits", type=bits, default=8, help="gradient code bits with --quantizer")
    cost.add_argument("--block", type=int_in(2),
                      help="mxint's values along K per shared scale (default: the config's "
                           "pipeline.block)")
    cost.add_argument("--weights", nargs="+", choices=list(WEIGHT_FORMATS), metavar="W",
                      help=f"with --model: how the weights are stored ({' '.join(WEIGHT_FORMATS)}; "
                           f"default fp32); with several formats here or in --momentum, one row "
                           f"per pair: the update's share of the step (PSQ, or each --quantizer)")
    cost.add_argument("--momentum", nargs="+", choices=list(MOMENTUM_FORMATS), metavar="M",
                      help=f"with --model: how the momentum is stored "
                           f"({' '.join(MOMENTUM_FORMATS)}; default fp32)")
    cost.add_argument("--momentum-block", type=int_in(1), default=DEFAULT_BLOCK,
                      help="values per scale of int8 momentum")
    cost.add_argument("--csv", metavar="PATH", help="also write the table as CSV")

    sub.add_parser("bench", help="emulated integer GEMM time against numpy float32 matmul")

    defaults = RunConfig()
    run = sub.add_parser("run", help="train a model with its GEMMs on the simulated device")
    run.add_argument("--hw", default=defaults.hw, help=_hw_help(defaults.hw))
    run.add_argument("--quantizer", default=defaults.quantizer,
                     help=f"activation-gradient quantizer: {', '.join(METHODS)} (default psq)")
    run.add_argument("--mode", default=defaults.mode,
                     help="fp32 (no quantization), qat (forward quantized) or fqt (default)")
    run.add_argument("--model", default=defaults.model,
                     help="mlp (default), mlp6 (six layers deep), cnn, or gpt (a transformer "
                          "language model, on --dataset stdlib-docs)")
    run.add_argument("--dataset", default=defaults.dataset,
                     help="digits (default), mnist1d or synthetic (images); stdlib-docs (text: "
                          "the standard library's docstrings, for --model gpt)")
    run.add_argument("--grad-bits", type=bits, default=defaults.grad_bits,
                     help="activation-gradient bits, 2..8 (default 8)")
    run.add_argument("--range", dest="range_policy", default=defaults.range_policy,
                     help="ranges of the quantizers: dynamic (default), delayed (from each "
                          "tensor's history) or predicted (grad_input's per sample, from the "
                          "loss; the others delayed)")
    run.add_argument("--block", type=int_in(2), default=defaults.block,
                     help="with --quantizer mxint: values along K per shared scale, a power of "
                          "two (default: the config's pipeline.block, 32)")
    run.add_argument("--weights", default=defaults.weights,
                     help=f"how the weights are stored between steps: {', '.join(WEIGHT_FORMATS)} "
                          f"(default fp32: FP32 masters)")
    run.add_argument("--momentum", default=defaults.momentum,
                     help=f"how the momentum is stored: {', '.join(MOMENTUM_FORMATS)} (default fp32)")
    run.add_argument("--momentum-block", type=int_in(1), default=defaults.momentum_block,
                     help="values per scale of int8 momentum; must divide every layer's weights")
    run.add_argument("--epochs", type=int_in(1), default=defaults.epochs, help="training epochs")
    run.add_argument("--batch-size", type=int_in(1), default=defaults.batch_size,
                     help="samples per training step")
    run.add_argument("--lr", type=positive_float, default=defaults.lr,
                     help="peak learning rate (of the --schedule)")
    run.add_argument("--schedule", default=defaults.schedule,
                     help="learning rate: onecycle (default: warm-up, then annealed to ~0), "
                          "constant, or cosine (from --lr down to 10%% of it)")
    run.add_argument("--ptq-range", default=defaults.ptq_range,
                     help="with --quantizer ptq: affine (default: the data's range) or paper "
                          "(stretched so that 0 is exactly a code)")
    run.add_argument("--seed", type=SEED, default=defaults.seed,
                     help="seed of the data split, initialization, batch order and rounding")
    run.add_argument("--track-variance", type=int_in(0), default=defaults.track_variance,
                     metavar="N", help="every N epochs (from the first), log each layer's "
                                       "quantization / sampling variance ratio in metrics.csv "
                                       "(variance_ratio.<layer>; default 0: off)")
    run.add_argument("--out", help="run directory (default runs/<hw>-<model>-<dataset>-<mode>-seed<seed>); "
                                    "running the same config into it again resumes from its last "
                                    "checkpoint")
    run.add_argument("--restart", action="store_true",
                     help="start over in a run directory that holds an earlier run")

    sw = sub.add_parser("sweep", help="run a grid of fqtsim run points in parallel and tabulate them")
    for option, kind, default in (("--hw", str, [defaults.hw]), ("--quantizer", str, [defaults.quantizer]),
                                  ("--mode", str, [defaults.mode]), ("--model", str, [defaults.model]),
                                  ("--dataset", str, [defaults.dataset]),
                                  ("--grad-bits", integer, [defaults.grad_bits]),
                                  ("--range", str, [defaults.range_policy]),
                                  ("--weights", str, [defaults.weights]),
                                  ("--momentum", str, [defaults.momentum]),
                                  ("--momentum-block", integer, [defaults.momentum_block]),
                                  ("--epochs", integer, [defaults.epochs]),
                                  ("--batch-size", integer, [defaults.batch_size]),
                                  ("--lr", float, [defaults.lr]), ("--seed", integer, [defaults.seed]),
                                  ("--schedule", str, [defaults.schedule]),
                                  ("--ptq-range", str, [defaults.ptq_range]),
                                  ("--block", integer, [defaults.block])):
        sw.add_argument(option, nargs="+", type=kind, default=default,
                        dest="range_policy" if option == "--range" else None,
                        help=f"one or more values (default {' '.join(map(str, default))})")
    sw.add_argument("--out", required=True, help="sweep directory; a re-run skips finished points")
    sw.add_argument("--workers", type=integer, help="parallel runs (default: one per core)")
    sw.add_argument("--scheduler", help="run on a Dask cluster: its address (given up after 10 s "
                                        "if unreachable), or 'local' for an embedded one "
                                        "(default: a process pool)")

    var = sub.add_parser("variance", help="gradient variance per layer against its bound, PTQ/PSQ/BHQ "
                                          "at 2..8 bits, on the device")
    var.add_argument("--hw", default=defaults.hw, help=_hw_help(defaults.hw))
    var.add_argument("--model", help="mlp, mlp6 or cnn (default mlp; not with --run, whose model is used)")
    var.add_argument("--dataset", help="digits, mnist1d or synthetic (default digits; not with --run)")
    var.add_argument("--run", dest="from_run", help="use this fqtsim run directory's trained model "
                                                    "(and its dataset and seed) instead of "
                                                    "training one (QAT) first")
    var.add_argument("--epochs", type=int_in(1),
                     help=f"QAT epochs before measuring (default {VARIANCE_DEFAULTS['epochs']}; "
                          f"not with --run)")
    var.add_argument("--batch-size", type=int_in(1), default=64,
                     help="samples per batch (training and measuring)")
    var.add_argument("--batches", type=int_in(2), default=16, help="batches for the sampling variance")
    var.add_argument("--draws", type=int_in(2), default=32,
                     help="backward passes per quantizer and width")
    var.add_argument("--bits", type=bits, nargs="+", default=list(range(2, 9)),
                     help="gradient widths to measure")
    var.add_argument("--quantizer", nargs="+", choices=VARIANCE_METHODS, default=list(VARIANCE_METHODS),
                     dest="quantizers", help="gradient quantizers to measure")
    var.add_argument("--seed", type=SEED,
                     help=f"seed (default {VARIANCE_DEFAULTS['seed']}; not with --run, whose seed "
                          f"is used)")
    var.add_argument("--out", required=True, help="directory for variance.csv and variance.png")

    rep = sub.add_parser("report", help="overhead report (HTML, Markdown, PNG, CSV) from runs "
                                        "and/or the cost model")
    rep.add_argument("runs", nargs="*", help="run directories written by fqtsim run")
    rep.add_argument("--model", help=f"cost-model workload: {', '.join(WORKLOADS)}")
    rep.add_argument("--batch", type=int_in(1), default=64, help="batch for --model (default 64)")
    rep.add_argument("--hw", action="append", default=[], help="hardware config(s) for --model")
    rep.add_argument("--grad-bits", type=bits, default=8, help="gradient bits for --model")
    rep.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="fp32", metavar="W",
                     help=f"stored weights for --model ({', '.join(WEIGHT_FORMATS)})")
    rep.add_argument("--momentum", choices=list(MOMENTUM_FORMATS), default="fp32", metavar="M",
                     help=f"stored momentum for --model ({', '.join(MOMENTUM_FORMATS)})")
    rep.add_argument("--momentum-block", type=int_in(1), default=DEFAULT_BLOCK,
                     help="values per scale of int8 momentum, for --model")
    rep.add_argument("--out", required=True, help="report directory: new, empty, or an earlier "
                                                  "report (replaced whole)")
    return parser


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(_attach_dash_values(parser, argv))
    _refuse_repeats(parser, argv, args.command)
    args.argv = argv
    _log_to_stderr()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:   # output piped into a reader that stopped (| head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # bad input, unwritable paths: one line, no traceback
        parser.exit(2, f"fqtsim {args.command}: error: {_message(e)}\n")
    except Interrupted as e:   # Ctrl-C in a run: what was kept
        parser.exit(130, f"fqtsim {args.command}: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"fqtsim {args.command}: interrupted\n")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def _option(sub: argparse.ArgumentParser, token: str):
    """The option action that `token` (`--name`, `--name=value`, or a unique prefix of a long
    option, as argparse allows) stands for, with the option as typed; (None, None) if none."""
    if not token.startswith("-") or token == "--":
        return None, None
    name = token.split("=", 1)[0] if token.startswith("--") else token
    actions = sub._option_string_actions
    if name in actions:
        return actions[name], name
    if name.startswith("--"):
        hits = {actions[o] for o in actions if o.startswith(name)}
        if len(hits) == 1:
            return hits.pop(), name
    return None, None


def _command_index(parser, argv) -> int | None:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return next((i for i, t in enumerate(argv) if sub is not None and t in sub.choices), None)


def _attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--gemm -1x5x5`, `--lr -1e-3`: argparse takes a value that starts with '-' for an option
    and answers 'expected one argument'; attach it (`--gemm=-1x5x5`) so that the option's own
    check names what is wrong. Only for options that take one value, and only when the next
    token is not itself an option."""
    at = _command_index(parser, argv)
    if at is None:
        return argv
    sub = _subparser(parser, argv[at])
    out = argv[:at + 1]
    i = at + 1
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out += argv[i:]
            break
        action, _ = _option(sub, token)
        if (action is not None and action.nargs is None and "=" not in token
                and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--"
                and _option(sub, argv[i + 1])[0] is None):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _refuse_repeats(parser: argparse.ArgumentParser, argv: list[str], command: str):
    """An option given twice would silently take its last value: refuse it, naming the option
    (except the options meant to repeat: action="append", e.g. cost --gemm, report --hw)."""
    at = _command_index(parser, argv)
    sub = _subparser(parser, command)
    if at is None or sub is None:
        return
    seen = {}
    for token in argv[at + 1:]:
        if token == "--":
            break
        action, name = _option(sub, token)
        if action is None or isinstance(action, (argparse._AppendAction, argparse._CountAction,
                                                 argparse._ExtendAction, argparse._HelpAction)):
            continue
        if action in seen:
            shown = name if name == seen[action] else f"{seen[action]} (as {name})"
            sub.error(f"argument {shown}: given twice; give each option once"
                      + (f" (several values go after one {seen[action]})"
                         if action.nargs in ("+", "*") else ""))
        seen[action] = name


def _message(e: Exception) -> str:
    if not isinstance(e, OSError):
        return str(e)
    reason = e.strerror or str(e)
    return f"{e.filename}: {reason}" if e.filename else reason


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (tests swap it)."""
    stream = property(lambda self: sys.stderr, lambda self, value: None)


def _log_to_stderr():
    """The library's progress lines (resuming, a line per epoch in logs) as plain stderr lines."""
    logger = logging.getLogger("fqtsim")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def cmd_cost(args) -> int:
    from fqtsim import load_hw
    from fqtsim.files import claim_file
    from fqtsim.hardware.hw import resolve_hw, with_block

    hw = with_block(load_hw(args.hw), args.block)
    if args.csv is not None:
        claim_file(args.csv, inputs=[resolve_hw(args.hw)])
    for option, values in (("--quantizer", args.quantizer or []), ("--range", args.range_policy),
                           ("--weights", args.weights or []), ("--momentum", args.momentum or [])):
        if len(set(values)) < len(values):
            raise ValueError(f"{option}: {' '.join(values)} names a value twice; give each once")
    if (args.gemm is None) == (args.model is None):
        raise ValueError("give --gemm MxKxN (one or more) or --model NAME")
    if args.batch is not None and args.model is None:
        raise ValueError("--batch: the samples of a --model step; a --gemm shape has its own M")
    if (args.weights or args.momentum) and args.model is None:
        raise ValueError("--weights, --momentum: how a --model step's update stores its state; a "
                         "--gemm shape has no update")
    if args.model is not None:
        return step_table(hw, args)
    if args.quantizer:
        quantizer_table(hw, args)
    else:
        gemm_table(hw, args)
    print(f"\n{energy_line(hw)}")
    _state_bounds(hw, [(f"{m}x{k}x{n}", k) for m, k, n in args.gemm],
                  args.grad_bits if args.quantizer else args.a_bits, args.b_bits)
    return 0


def gemm_table(hw, args):
    import fqtsim.simulation.cost
    from fqtsim.files import write_atomic
    from fqtsim.simulation.ledger import summarize

    ledger = pd.concat([fqtsim.simulation.cost.gemm(hw, m, n, k, a_bits=args.a_bits, b_bits=args.b_bits,
                                         out_bits=args.out_bits, writeback=args.writeback,
                                         scope=args.scope, name=f"{m}x{k}x{n}")
                        for m, k, n in args.gemm], ignore_index=True)
    print(f"{hw.name}: {hw.description}\n")
    with pd.option_context("display.width", 200, "display.float_format", "{:,.0f}".format):
        print(ledger.to_string(index=False))
        print("\ntotals (bytes moved by level, MACs, energy in pJ, elapsed cycles):")
        print(summarize(ledger).to_string(index=False))
    if args.csv:
        write_atomic(args.csv, ledger.to_csv(index=False))
        print(f"\nwrote {args.csv}")


def energy_line(hw) -> str:
    """The energy figures the costs above were priced with, and where they came from."""
    tcm, e = hw.tcm, hw.energy
    source = (f"the {hw.technology} table (fqtsim.hardware.energy) for {len(hw.derived)} of them"
              if hw.derived else "all as the config states them")
    buffers = ("" if tcm.operand_pj is None else
               f" (A, B buffers {tcm.operand_pj[0][0]:.3g}, {tcm.operand_pj[1][0]:.3g})")
    return (f"energy figures, {source}: MAC 8x8 {e.mac_pj(8, 8, hw.accumulator.bits):.3g} pJ, TCM "
            f"{tcm.read_pj_per_byte:.3g}/{tcm.write_pj_per_byte:.3g} pJ/B read/write{buffers}, "
            f"DDR {hw.ddr.read_pj_per_byte:.4g}/{hw.ddr.write_pj_per_byte:.4g} pJ/B, static "
            f"{e.static_mw:g} mW")


def _state_bounds(hw, gemms, a_bits: int, b_bits: int) -> list[str]:
    """Print the worst-case accumulator magnitudes of `gemms` [(name, K)] (A: activation or
    gradient codes of a_bits, B: weight codes of b_bits) and a warning line for each way they
    can overflow; returns the warnings."""
    from fqtsim.hardware.overflow import gemm_bound, summary

    line, warnings = summary(hw, [(name, gemm_bound(hw, k, a_bits, b_bits)) for name, k in gemms])
    print(f"accumulator bound, {a_bits}-bit A codes x {b_bits}-bit weight codes: {line}")
    for warning in warnings:
        print(f"warning: {warning}")
    return warnings


def _training_bounds(cfg) -> list[str]:
    """Print the worst cases of the GEMMs `cfg`'s training puts on its config; their warnings."""
    from fqtsim import load_hw
    from fqtsim.hardware.overflow import summary, training_bounds
    from fqtsim.training.data import load
    from fqtsim.training.train import _layers

    if cfg.mode == "fp32":   # nothing runs on the device
        return []
    hw = load_hw(cfg.hw)
    bounds = training_bounds(hw, _layers(cfg, load(cfg.dataset, seed=cfg.seed)), cfg.batch_size,
                             cfg.grad_bits)
    line, warnings = summary(hw, bounds if cfg.mode == "fqt" else bounds[:1])
    print(f"accumulator bound of the training's GEMMs (8-bit forward and weight-gradient codes, "
          f"{cfg.grad_bits}-bit gradients): {line}")
    for warning in warnings:
        print(f"warning: {warning}")
    return warnings


def step_table(hw, args) -> int:
    import fqtsim.simulation.cost
    from fqtsim.simulation.schedule import QuantScheme

    args.batch = args.batch or 64
    pairs = list(itertools.product(args.weights or ["fp32"], args.momentum or ["fp32"]))
    if len(pairs) > 1:
        return formats_table(hw, args, pairs)
    (weights, momentum), = pairs
    schemes = [QuantScheme(q, r) for q in (args.quantizer or ["ptq", "psq", "bhq"])
               for r in args.range_policy]
    table = fqtsim.simulation.cost.step_overhead(hw, args.model, args.batch, schemes,
                                                 args.grad_bits, weights, momentum,
                                                 args.momentum_block)
    stored = f", {weights} weights and {momentum} momentum" if (weights, momentum) != (
        "fp32", "fp32") else ""
    return _print_table(hw, table, args.csv, f"{args.grad_bits}-bit gradients{stored}: extra over "
                        f"delayed PTQ (ranges known before their GEMMs), quantizers riding the "
                        f"passes between the GEMMs (shared) or not", args)


def formats_table(hw, args, pairs) -> int:
    """`cost --model` with several stored formats: the update per (weights, momentum) pair."""
    import fqtsim.simulation.cost

    tables = []
    for q in args.quantizer or ["psq"]:
        for r in args.range_policy:
            table = fqtsim.simulation.cost.update_costs(hw, args.model, args.batch, pairs, q, r,
                                                        args.grad_bits, args.momentum_block)
            tables.append(table.assign(quantizer=q, range=r))
    table = pd.concat(tables, ignore_index=True)
    return _print_table(hw, table, args.csv, f"{args.grad_bits}-bit gradients, per stored format "
                        f"of the weights and momentum: where the state lives, its MB, the step's "
                        f"energy and DDR traffic, and the update's share of each", args)


def _print_table(hw, table: pd.DataFrame, csv, what: str, args) -> int:
    """Print a `cost --model` table under its config and what it shows; write it to `csv`."""
    from fqtsim.files import write_atomic

    print(f"{hw.name}: {hw.description}\n\none training step of {args.model} at batch "
          f"{args.batch}, {what}")
    with pd.option_context("display.width", 200):
        print(table.to_string(index=False, float_format=_figure))
    print(f"\n{energy_line(hw)}")
    if csv:
        write_atomic(csv, table.to_csv(index=False))
        print(f"\nwrote {csv}")
    return 0


def _figure(v: float) -> str:
    """A table figure: thousands separated to a tenth, small ones to four significant digits."""
    return f"{v:,.1f}" if abs(v) >= 100 or v == 0 else f"{v:.4g}"


def quantizer_table(hw, args):
    import fqtsim.simulation.cost
    from fqtsim.files import write_atomic
    from fqtsim.simulation.schedule import QuantScheme

    schemes = [QuantScheme(q, r) for q in args.quantizer for r in args.range_policy]
    tables = []
    print(f"{hw.name}: {hw.description}")
    for m, k, n in args.gemm:
        table = fqtsim.simulation.cost.overhead(hw, m, n, k, schemes, grad_bits=args.grad_bits,
                                                b_bits=args.b_bits)
        table.insert(0, "gemm", f"{m}x{k}x{n}")
        tables.append(table)
        print(f"\ndX = Q(dY) W, dY {m}x{k} at {args.grad_bits} bits, W {k}x{n}: "
              f"extra over the fused baseline")
        with pd.option_context("display.width", 200):
            print(table.drop(columns="gemm").to_string(index=False, formatters={
                **{c: "{:,.0f}".format for c in ("extra_tcm_bytes", "extra_ddr_bytes",
                                                 "extra_vector_ops", "extra_energy_pj")},
                "energy_x": "{:.2f}x".format, "cycles_x": "{:.2f}x".format}))
    if args.csv:
        write_atomic(args.csv, pd.concat(tables, ignore_index=True).to_csv(index=False))
        print(f"\nwrote {args.csv}")


def cmd_bench(args) -> int:
    from fqtsim.analysis.bench import cost_model_bench, format_bench, gemm_bench, train_step_bench

    print("emulated integer GEMM vs numpy float32 matmul, same shape, same process "
          "(ratio = sgemm time / emulated time; higher is better)")
    print(format_bench(gemm_bench()))
    print("\ntraining step: FQT on the device (npu.yaml, 32-bit accumulators, PSQ 8-bit) vs the "
          "same model's fp32 torch step (ratio = fqt / fp32; lower is better)")
    print(train_step_bench().to_string(index=False, float_format="{:.2f}".format))
    print("\ncost model: fqtsim.cost.training_step, the mapper planning every GEMM the first time "
          "(all quantizers together), then per step once planned (seconds)")
    print(cost_model_bench().to_string(index=False, float_format="{:.3f}".format))
    return 0


def cmd_run(args) -> int:
    from fqtsim.training.train import Diverged, train

    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "argv", "restart")})
    bounds = _training_bounds(cfg)
    try:
        summary = train(cfg, restart=args.restart)
    except Diverged as e:
        print(f"fqtsim run: stopped: {e}. Metrics and ledger so far are in {cfg.run_dir}",
              file=sys.stderr)
        return 1
    print(format_summary(summary))
    for warning in [*summary.get("warnings", []), *bounds]:   # beside the costs they qualify
        print(f"warning: {warning}")
    mapping = " mapping.csv" if cfg.mode == "fqt" else ""
    print(f"\nrun directory {cfg.run_dir}/: config.json metrics.csv ledger.csv{mapping} model.pt "
          f"summary.json")
    return 0


def format_summary(s: dict) -> str:
    mode = s["mode"] if s["mode"] != "fqt" else f"fqt, {s['quantizer']} {s['grad_bits']}-bit gradients, {s['range_policy']} ranges"
    if (s.get("weights", "fp32"), s.get("momentum", "fp32")) != ("fp32", "fp32"):
        mode += f", {s['weights']} weights, {s['momentum']} momentum"
    lines = [f"{s['model']} on {s['dataset']}, {mode}, {s['hw']}: {s['steps']} steps in {s['seconds']:.0f} s"]
    if "val_loss" in s:   # a language model: per character, on the validation text
        lines += [f"  val loss       {s['val_loss']:.4f} nats/char ({s['bits_per_char']:.3f} bits/char)",
                  f"  val accuracy   {100 * s['accuracy']:.2f} % (next character)"]
    else:
        lines += [f"  test accuracy  {100 * s['accuracy']:.2f} %", f"  test loss      {s['loss']:.4f}"]
    for level, moved in s["bytes_by_level"].items():
        lines.append(f"  {level} bytes      {moved:,.0f}")
    for kind, count in s["ops"].items():
        lines.append(f"  {kind + ' ops':<14} {count:,}")
    lines += [f"  energy         {s['energy_pj'] / 1e6:,.2f} uJ", f"  cycles         {s['cycles']:,.0f}",
              f"  device time    {1e3 * s['device_seconds']:,.2f} ms",
              f"  overflows      {s['overflows']:,}", f"  clips          {s['clips']:,}"]
    return "\n".join(lines)


def cmd_report(args) -> int:
    from fqtsim.analysis.report import build_report

    out = build_report(args.out, args.runs, args.model, args.batch, args.hw, args.grad_bits,
                       command="fqtsim " + shlex.join(args.argv),
                       stored={"weights": args.weights, "momentum": args.momentum,
                               "momentum_block": args.momentum_block})
    print(f"wrote {out}/report.html and report.md, with PNG plots and CSV tables")
    return 0


def cmd_sweep(args) -> int:
    from fqtsim.analysis.sweep import grid, sweep

    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "argv", "out", "workers", "scheduler")}
    points = grid(**options)
    results = sweep(points, args.out, args.workers, args.scheduler)
    n = results.attrs
    print(f"{n['points']} points: {n['skipped']} skipped (already done), {n['ran']} ran: "
          f"{n['ran'] - n['failed']} done, {n['failed']} failed; wrote {args.out}/results.csv, "
          f"table.csv, table.md")
    return 1 if n["failed"] else 0


def cmd_variance(args) -> int:
    from fqtsim.analysis.variance import run

    options = {k: v for k, v in vars(args).items() if k not in ("command", "argv")}
    for option, values in (("--bits", args.bits), ("--quantizer", args.quantizers)):
        if len(set(values)) < len(values):
            raise ValueError(f"{option}: {' '.join(map(str, values))} names a value twice; "
                             f"give each once")
    table = run(**options)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3g}".format):
        print(table.drop(columns=["model", "draws"]).to_string(index=False))
    print(f"\nwrote {args.out}/variance.csv and variance.png")
    return 0


COMMANDS = {"cost": cmd_cost, "bench": cmd_bench, "run": cmd_run, "report": cmd_report,
            "sweep": cmd_sweep, "variance": cmd_variance}

if __name__ == "__main__":
    sys.exit(main())
