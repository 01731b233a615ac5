"""The `lepton-edge` command line.

User errors (LeptonError) print one line and exit 1; usage errors exit 2; anything else is
a bug and says so (exit 3). `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click
import numpy as np

from lepton_edge.errors import InputError, LeptonError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="lepton-edge")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile models once with Apache TVM; run them on the best device a machine has."""
    ctx.obj = {"debug": debug}


@cli.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", "targets", multiple=True, default=("cpu",), show_default=True,
              help="Target or profile name (repeatable); see `lepton-edge targets`.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Artifact to write (default: MODEL with .lepton).")
@click.option("--no-fallback", is_flag=True,
              help="Refuse nodes no target supports instead of running them on onnxruntime.")
@click.option("--golden", "golden_count", default=2, show_default=True,
              help="Number of seeded golden input cases stored in the artifact.")
@click.option("--tune", default=0, show_default=True, metavar="TRIALS",
              help="MetaSchedule trial budget for the CPU kernels (0: no tuning; try 256).")
@click.option("--tuning-db", type=click.Path(file_okay=False, path_type=Path),
              help="Tuning database folder [default: ~/.cache/lepton-edge/tuning/<target>].")
@click.option("--batch-buckets", default=None, metavar="SIZES",
              help="Batch sizes an untuned CPU build gets a static entry function for "
                   "(comma-separated; 'none': the symbolic batch only) [default: 1].")
def compile_cmd(model: Path, targets: tuple[str, ...], output: Path | None, no_fallback: bool,
                golden_count: int, tune: int, tuning_db: Path | None,
                batch_buckets: str | None) -> None:
    """Compile MODEL (.onnx) into one .lepton artifact."""
    import lepton_edge

    buckets = None if batch_buckets is None else _batch_sizes(batch_buckets)
    out = output or model.with_suffix(".lepton")
    start = time.perf_counter()
    loaded = lepton_edge.load(model)
    art = lepton_edge.compile(loaded, list(targets), fallback=not no_fallback,
                              golden_count=golden_count, tune=tune, tuning_db=tuning_db,
                              log=lambda msg: click.echo(msg, err=True), batch_buckets=buckets)
    art.save(out)
    click.echo(art.summary())
    click.echo(f"wrote {out} ({out.stat().st_size:,} bytes) in "
               f"{time.perf_counter() - start:.1f} s")


def _batch_sizes(text: str) -> tuple[int, ...]:
    """--batch-buckets: "1,8" -> (1, 8); "none" (or "") -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.UsageError(f"--batch-buckets {text}: write positive batch sizes separated "
                               "by commas, e.g. 1 or 1,8, or 'none'")
    return sizes


@cli.command("prune")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Pruned ONNX model to write.")
@click.option("--calib", type=click.Path(path_type=Path), required=True,
              help="Calibration data: a .npy file (single-input models) or a folder of .npy.")
@click.option("--mode", type=click.Choice(["structured", "unstructured"]), default="structured",
              show_default=True)
@click.option("--sparsity", type=float, help="Fraction of the prunable layers' weights to remove.")
@click.option("--mac-reduction", type=float, help="Fraction of MACs to remove (structured).")
@click.option("--threshold", type=float,
              help="Largest output change allowed (relative L2 error of the outputs).")
@click.option("--ratio", "ratios", multiple=True, metavar="NODE=R",
              help="Prune NODE's channels (weights) by fraction R, without a scan (repeatable).")
@click.option("--exclude", multiple=True, metavar="NODE", help="Leave NODE whole.")
@click.option("--grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True,
              help="Comma-separated ratios the sensitivity scan tries on each layer.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the sensitivity curves (PNG).")
def prune_cmd(model: Path, output: Path, calib: Path, mode: str, sparsity: float | None,
              mac_reduction: float | None, threshold: float | None, ratios: tuple[str, ...],
              exclude: tuple[str, ...], grid: str, plot: Path | None) -> None:
    """Prune MODEL under one budget, measured on --calib, and report what it cost."""
    import onnx

    import lepton_edge
    from lepton_edge.compress.prune import prune

    by_node: dict[str, float] = {}
    for item in ratios:
        node, sep, value = item.rpartition("=")
        try:
            by_node[node] = float(value)
        except ValueError:
            sep = ""
        if not sep or not node:
            raise click.UsageError(f"--ratio {item}: write NODE=R, e.g. conv1=0.25")
    try:
        ratios_grid = tuple(float(v) for v in grid.split(","))
    except ValueError:
        raise click.UsageError(f"--grid {grid}: write comma-separated ratios, e.g. 0.25,0.5"
                               ) from None
    data = _calibration_data(calib)
    pruned = prune(lepton_edge.load(model), data, mode=mode, sparsity=sparsity,
                   mac_reduction=mac_reduction, threshold=threshold,
                   ratios=by_node or None, exclude=exclude, grid=ratios_grid, progress=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(pruned.proto, output)
    report = pruned.report
    if report.sensitivity is not None:
        click.echo(report.sensitivity.table())
        if plot is not None:
            click.echo(f"plot: {report.sensitivity.plot(plot)}")
    elif plot is not None:
        click.echo("no plot: --ratio skips the sensitivity scan", err=True)
    click.echo(report.table())
    click.echo(f"wrote {output}")


@cli.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="QDQ ONNX model to write.")
@click.option("--calib", type=click.Path(path_type=Path), required=True,
              help="Calibration data: a .npy file (single-input models) or a folder of .npy.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]),
              default="minmax", show_default=True)
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor, not per channel.")
@click.option("--symmetric-activations", is_flag=True)
@click.option("--scale", type=float, help="Fixed activation scale instead of calibration.")
@click.option("--keep-float", multiple=True, metavar="NODE", help="Leave NODE in float.")
@click.option("--min-cosine", type=float,
              help="Keep the worst layers float until every output's cosine to fp32 >= this.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the per-layer error plot (PNG).")
@click.option("--quantize-ops", default="lepton", show_default=True, metavar="lepton|all|OPS",
              help="Which nodes get QDQ: 'lepton' (where lepton-edge's integer kernels pay "
                   "off), 'all' (onnxruntime's default) or comma-separated op types.")
@click.option("--activation-matmuls", is_flag=True,
              help="With 'lepton': also quantize matmuls of two activations (attention).")
@click.option("--weight-bits", type=click.Choice(["8", "7"]), default="8", show_default=True,
              help="Weight range: 8 = [-127, 127]; 7 = [-64, 64] (onnxruntime's reduce_range): "
                   "exact, faster vpmaddubsw int8 kernels on AVX2 CPUs without VNNI, about "
                   "twice the weight rounding error.")
def quantize_cmd(model: Path, output: Path, calib: Path, method: str, per_tensor: bool,
                 symmetric_activations: bool, scale: float | None, keep_float: tuple[str, ...],
                 min_cosine: float | None, plot: Path | None, quantize_ops: str,
                 activation_matmuls: bool, weight_bits: str) -> None:
    """Quantize MODEL to int8 QDQ ONNX, calibrated on --calib, and report the error."""
    import onnx

    import lepton_edge
    from lepton_edge.compress.quantize import quantize

    data = _calibration_data(calib)
    quantized = quantize(lepton_edge.load(model), data, method=method,
                         per_channel=not per_tensor, symmetric_activations=symmetric_activations,
                         scale=scale, keep_float=keep_float, min_output_cosine=min_cosine,
                         progress=True, activation_matmuls=activation_matmuls,
                         weight_bits=int(weight_bits),
                         op_types=(quantize_ops if quantize_ops in ("lepton", "all")
                                   else [t.strip() for t in quantize_ops.split(",") if t.strip()]))
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized.proto, output)
    click.echo(quantized.report.table())
    if plot is not None:
        click.echo(f"plot: {quantized.report.plot(plot)}")
    click.echo(f"wrote {output}")


def _calibration_data(calib: Path) -> Any:
    """A .npy file is loaded here; a folder is handed on (the calibrator reads it)."""
    if not calib.is_file():
        return calib
    try:
        return np.load(calib, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{calib} is not a readable .npy array ({exc})") from None


def _parse_inputs(values: tuple[str, ...], names: list[str]) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(names) != 1:
                raise click.UsageError(
                    f"--input {value}: the model has inputs {names}; write NAME=FILE.npy")
            name, path = names[0], value
        file = Path(path)
        if not file.is_file():
            raise InputError(f"input file not found: {file}")
        try:
            feeds[name] = np.load(file, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(f"{file} is not a readable .npy array ({exc})") from None
    return feeds


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy",
              help="An input array (repeatable).")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each output as DIR/<name>.npy.")
@click.option("--check", is_flag=True, help="Replay the artifact's golden I/O and report.")
@click.option("--device", "devices", multiple=True,
              help="Allow only these device kinds (repeatable); needed for explicit-only ones.")
@click.option("--no-fallback", is_flag=True, help="Fail instead of using a fallback build.")
@click.option("--tolerance", type=float, default=None,
              help="--check relative tolerance [default: 1e-4, 1e-2 for int8 models].")
def run_cmd(artifact: Path, inputs: tuple[str, ...], output_dir: Path | None, check: bool,
            devices: tuple[str, ...], no_fallback: bool, tolerance: float | None) -> None:
    """Run ARTIFACT on this machine's devices."""
    from lepton_edge import runtime

    session = runtime.load(artifact, devices=list(devices) or None, fallback=not no_fallback)
    for placement in session.placement.values():
        click.echo(f"placed {placement}", err=True)
    if check:
        report = session.self_test(tolerance)
        click.echo(str(report))
        if not report.passed:
            raise SystemExit(1)
    if not inputs:
        if not check:
            raise click.UsageError("give --input NAME=FILE.npy (or --check)")
        return
    feeds = _parse_inputs(inputs, [s.name for s in session.inputs])
    start = time.perf_counter()
    outputs = session.run(feeds)
    elapsed = (time.perf_counter() - start) * 1e3
    for name, whole in outputs.items():
        if whole is None:  # an absent optional output
            click.echo(f"{name}: None (absent optional)")
            continue
        # a sequence output is a list: one line and one DIR/<name>.<i>.npy per element
        items = ([(f"{name}[{i}]", f"{name}.{i}", v) for i, v in enumerate(whole)]
                 if isinstance(whole, list) else [(name, name, whole)])
        if isinstance(whole, list):
            click.echo(f"{name}: sequence of {len(whole)} tensor(s)")
        for label, stem, value in items:
            preview = np.array2string(value.ravel()[:6], precision=4, separator=", ")
            click.echo(f"{label}: {value.dtype}{list(value.shape)} {preview}")
            if output_dir is not None:
                output_dir.mkdir(parents=True, exist_ok=True)
                np.save(output_dir / f"{_safe(stem)}.npy", value, allow_pickle=False)
    click.echo(f"ran in {elapsed:.2f} ms", err=True)


@cli.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The original fp32 .onnx, for onnxruntime (the artifact does not hold it).")
@click.option("--int8-model", type=click.Path(dir_okay=False, path_type=Path),
              help="A QDQ int8 .onnx, to also time onnxruntime int8.")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy",
              help="An input array (repeatable); without it, random inputs at --batch.")
@click.option("--batch", default=1, show_default=True,
              help="Batch size of the random inputs (ignored with --input).")
@click.option("--runs", default=30, show_default=True, help="Timed calls per engine.")
@click.option("--warmup", default=5, show_default=True, help="Untimed calls per engine.")
@click.option("--block", default=3, show_default=True,
              help="Timed calls per engine block (engines take turns block by block).")
@click.option("--pause-ms", default=100.0, show_default=True,
              help="Idle time before each block, so the other engine's threads go idle.")
@click.option("--min-block-ms", default=20.0, show_default=True,
              help="Engines with shorter calls get longer blocks, at least this long "
                   "(more timed calls); 0: exactly --block calls per block.")
@click.option("--threads", type=int, default=None,
              help="Threads for every engine (TVM_NUM_THREADS, onnxruntime intra-op) "
                   "[default: each engine's own].")
@click.option("--no-peak", is_flag=True, help="Skip the CPU peak measurement (roofline).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_cmd(artifact: Path, model_path: Path | None, int8_model: Path | None,
              inputs: tuple[str, ...], batch: int, runs: int, warmup: int, block: int,
              pause_ms: float, min_block_ms: float, threads: int | None, no_peak: bool,
              as_json: bool) -> None:
    """Time ARTIFACT against onnxruntime (fp32, int8) on the same inputs, in per-engine
    blocks (rotating order, a pause before each block); the report's footer says how."""
    if batch < 1:
        raise click.UsageError(f"--batch {batch}: must be >= 1")
    if threads is not None:
        if threads < 1:
            raise click.UsageError(f"--threads {threads}: must be >= 1")
        os.environ["TVM_NUM_THREADS"] = str(threads)  # before TVM starts its thread pool
    from lepton_edge import bench, runtime
    specs = runtime.load(artifact).inputs
    feeds: dict[str, Any] = (_parse_inputs(inputs, [s.name for s in specs]) if inputs
                             else bench.random_feeds(specs, batch))
    vs = ("onnxruntime",) if model_path is not None else ()
    report = bench.compare(artifact, feeds, vs=vs, model_path=model_path,
                           int8_model=int8_model, runs=runs, warmup=warmup,
                           peak=not no_peak, block=block, pause_ms=pause_ms, threads=threads,
                           min_block_ms=min_block_ms)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        click.echo(report.table())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "out"


@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect_cmd(artifact: Path, as_json: bool) -> None:
    """Verify ARTIFACT and show its manifest, builds, sizes and versions."""
    from lepton_edge import artifact as fmt
    from lepton_edge.signature import TensorSpec

    verified = fmt.read(artifact)
    m = verified.manifest
    if as_json:
        click.echo(json.dumps(m, indent=1, sort_keys=True))
        return
    total = sum(len(d) for d in verified.files.values())
    click.echo(f"{artifact}: verified ({len(verified.files)} files, {total:,} bytes, "
               f"schema {m['schema_version']}, created {m.get('created', '?')})")
    opsets = m["model"].get("opsets") or {"ai.onnx": m["model"]["opset"]}
    click.echo(f"model: {m['model']['name']} opset "
               + ", ".join(f"{v}" if d == "ai.onnx" else f"{d} {v}" for d, v in opsets.items())
               + f" sha256 {m['model']['sha256'][:16]}...")
    click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    for kind in ("inputs", "outputs"):
        specs = ", ".join(str(TensorSpec.from_json(s)) for s in m[kind])
        click.echo(f"{kind}: {specs}")
    for sg in m["subgraphs"]:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(sg["op_counts"].items()))
        click.echo(f"{sg['id']} (level {sg['level']}, {sg['node_count']} nodes, "
                   f"{sg['macs']:,} MACs): {ops}")
        for b in sg["builds"]:
            size = sum(m["files"][p]["size"] for p in b["files"].values())
            extra = ", ".join(f"{k}={v}" for k, v in b["meta"].items()
                              if k in ("mcpu", "arch", "requires", "tvm"))
            click.echo(f"  build {b['target']} [{b['profile']}] priority {b['priority']}: "
                       f"{size:,} bytes; {extra}")
            if b["meta"].get("int8_kernels") or b["meta"].get("qdq_kept_float"):
                click.echo(f"    int8 kernels: {len(b['meta'].get('int8_kernels', []))}; "
                           f"QDQ left as float: {len(b['meta'].get('qdq_kept_float', []))}")
                for why in b["meta"].get("qdq_kept_float", []):
                    click.echo(f"      float: {why}")
        for target, reason in sg.get("build_errors", {}).items():
            click.echo(f"  {target} build failed: {reason}")
    click.echo(f"golden cases: {len(m.get('golden', []))}")


@cli.command("unpack")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
def unpack_cmd(artifact: Path, dest: Path) -> None:
    """Verify ARTIFACT and extract its files into DEST (e.g. for the C++ runtime)."""
    from lepton_edge import artifact as fmt

    verified = fmt.read(artifact)
    if dest.exists() and any(dest.iterdir()):
        raise LeptonError(f"{dest} is not empty; unpack into a new folder")
    paths = verified.extract(sorted(verified.files), dest)
    (dest / fmt.MANIFEST).write_text(json.dumps(verified.manifest, indent=1, sort_keys=True))
    click.echo(f"extracted {len(paths)} verified files and the manifest into {dest}")


@cli.command("devices")
@click.option("--json", "as_json", is_flag=True)
def devices_cmd(as_json: bool) -> None:
    """What this machine has: CPU and ISA features, GPUs, FPGAs, and usable device kinds."""
    from lepton_edge.runtime.devices import (
        cpu_info, nvidia_gpus, probe_devices, tvm_cuda_devices, xilinx_fpgas,
    )

    cpu = cpu_info()
    gpus, gpu_reason = nvidia_gpus()
    fpgas, fpga_reason = xilinx_fpgas()
    cuda, cuda_reason = tvm_cuda_devices()
    probed = probe_devices()
    if as_json:
        click.echo(json.dumps({
            "cpu": {"arch": cpu.arch, "model": cpu.model, "cores": cpu.cores, "isa": cpu.isa},
            "gpus": gpus, "tvm_cuda": cuda, "fpgas": fpgas,
            "devices": [{"kind": d.kind, "name": d.name, "present": d.present,
                         "reason": d.reason} for d in probed]}, indent=1))
        return
    vnni = "avx512_vnni" in cpu.features or "avx_vnni" in cpu.features
    click.echo(f"cpu: {cpu.model} ({cpu.arch}, {cpu.cores} logical cores)")
    click.echo(f"  isa: {' '.join(cpu.isa) or 'baseline'}")
    click.echo(f"  int8 dot products (VNNI): {'yes' if vnni else 'no'}")
    click.echo("gpus: " + (", ".join(gpus) if gpus else f"none ({gpu_reason})"))
    click.echo("cuda (TVM runtime): " + (", ".join(cuda) if cuda else f"none ({cuda_reason})"))
    click.echo("fpgas: " + (", ".join(fpgas) if fpgas else f"none ({fpga_reason})"))
    click.echo("device kinds lepton-edge can place subgraphs on:")
    for d in probed:
        state = "present" if d.present else f"absent: {d.reason}"
        if d.present and d.details.get("simulation"):
            state = (f"simulation only ({d.details.get('what', '')}; "
                     f"{d.details.get('hardware', '')}); used only with --device {d.kind}")
        click.echo(f"  {d.kind:<12} {d.name:<20} {state}")


@cli.command("targets")
def targets_cmd() -> None:
    """Known targets (plug-ins) and device profiles."""
    from lepton_edge.target import plugins, profiles

    known = plugins()
    click.echo("targets:")
    for name, plugin in sorted(known.items(), key=lambda kv: -kv[1].priority):
        click.echo(f"  {name:<12} priority {plugin.priority:<4} {plugin.description}")
    click.echo("profiles (use with -t):")
    for name, profile in sorted(profiles().items()):
        note = "" if profile.target in known else "  [target not available yet]"
        click.echo(f"  {name:<20} {profile.target:<6} {profile.description}{note}")


@cli.command("explain")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", "targets", multiple=True, default=("cpu",), show_default=True)
@click.option("--no-fallback", is_flag=True)
def explain_cmd(model: Path, targets: tuple[str, ...], no_fallback: bool) -> None:
    """Show how MODEL would be split across targets, and why nodes land where they do."""
    import lepton_edge

    plan = lepton_edge.partition(lepton_edge.load(model), list(targets),
                                 fallback=not no_fallback)
    click.echo(plan.explain())
    compilers = {plugin.name: plugin.make_target() for plugin, _ in plan.targets}
    chosen = {plugin.name: profile for plugin, profile in plan.targets}
    for sg in plan.subgraphs:
        if sg.target in compilers:
            for line in compilers[sg.target].notes(sg.proto, profile=chosen[sg.target]):
                click.echo(f"{sg.id} on {sg.target}: {line}")


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: map errors to one line and an exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return cli.main(args=argv, prog_name="lepton-edge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LeptonError as exc:
        if debug:
            traceback.print_exc()
        click.echo("error: " + " ".join(str(exc).split()), err=True)  # always one line
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: say so, one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"internal error ({type(exc).__name__}): {exc}. This is a lepton-edge bug; "
                   "rerun with --debug and report the traceback", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
