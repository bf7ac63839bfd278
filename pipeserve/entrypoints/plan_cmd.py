"""`pipeserve plan`: every TP x PP layout of a model on a described cluster, on paper. Starts no process and
reads no weights (a model's config at most)."""

from __future__ import annotations

import argparse
import sys


def _concurrency(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose a layout before renting the machines: memory, KV room and predicted "
                                    "throughput and latency of every TP x PP layout on a described cluster")
    p.add_argument("--model", required=True,
                   help="what `serve` takes (config only), or a built-in shape: llama-3.2-1b, llama-3-8b, "
                        "llama-3-70b, llama-3.1-405b")
    p.add_argument("--gpu", required=True, help="L4, A10G, A100-40GB, A100-80GB, H100, H200, cpu, or a "
                                                "--device-spec's name")
    p.add_argument("--device-spec", default=None, help="JSON (or YAML with PyYAML) file describing one more device")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--inter-node-gbps", type=float, default=100.0, help="link between machines, Gbit/s")
    p.add_argument("--intra-node", choices=("pcie", "nvlink"), default=None,
                   help="link inside a machine (default: nvlink where the device has it, else pcie)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--concurrency", type=_concurrency, default=None,
                   help="requests in flight, or auto (default): as many as the KV cache holds, up to max_num_seqs "
                        "per virtual engine")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks per rank, as serve's flag (instead of sizing them from memory)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPUs), float32, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--png", default=None, help="also draw the fitting layouts side by side into this PNG file")
    p.add_argument("--calibrate", action="store_true",
                   help="with --gpu cpu: measure this machine first (the model's decoder layer per TP rank shape, "
                        "the all-reduce between busy ranks, GEMM rate, memory bandwidth, loopback link, cores; "
                        "about four minutes for a small model) and store the figures for later plans")
    p.add_argument("--calibration-file", default=None,
                   help="where --calibrate stores its figures and --gpu cpu reads them "
                        "(default ~/.cache/pipeserve/calibration-cpu.json, used where it exists)")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    """Print the plan; a bad input is one line on stderr and exit status 2."""
    try:
        text = _plan_text(args)
    except ValueError as exc:
        print(f"pipeserve plan: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(text)


def _plan_text(args: argparse.Namespace) -> str:
    from pipeserve.planner.hardware import resolve_device
    from pipeserve.planner.plan import Cluster, Workload, plan
    from pipeserve.planner.render import render_json, render_table
    from pipeserve.planner.shapes import plan_model_config

    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.inter_node_gbps <= 0:
        raise ValueError(f"--inter-node-gbps must be > 0, got {args.inter_node_gbps}")
    device = resolve_device(args.gpu, args.device_spec)
    intra = args.intra_node or ("nvlink" if device.nvlink_gbps > 0 else "pcie")
    if device.link_gbps(intra) <= 0:
        raise ValueError(f"{device.name} has no {intra} link; use --intra-node pcie")
    model = plan_model_config(args.model, args.dtype, "cpu" if device.name == "cpu" else "cuda")
    if device.name == "cpu":
        device = _cpu_device(args, model, device)
    elif args.calibrate or args.calibration_file:
        raise ValueError(f"--calibrate and --calibration-file measure this machine: use them with --gpu cpu, "
                         f"not {device.name}")
    cluster = Cluster(device, args.nodes, args.gpus_per_node, intra, args.inter_node_gbps)
    work = Workload(args.input_len, args.output_len, args.max_model_len, args.concurrency,
                    args.gpu_memory_utilization, args.num_kv_blocks)
    rows = plan(model, cluster, work)
    render = render_json if args.json else render_table
    text = render(model, cluster, work, rows)
    if args.png:
        from pipeserve.planner.render_png import write_png

        try:
            write_png(rows, text.splitlines()[0] if not args.json else f"plan: {model.path}", args.png)
        except OSError as exc:
            raise ValueError(f"--png {args.png!r}: cannot write it ({exc.strerror})") from None
    return text


def _cpu_device(args: argparse.Namespace, model, stated):
    """This machine's measured figures where a calibration file exists (measured now with --calibrate), else
    the `stated` cpu device."""
    import os

    from pipeserve.planner.calibration import calibrated_cpu, default_path, read_calibration, write_calibration
    path = args.calibration_file or default_path()
    if args.calibrate:
        from pipeserve.planner.calibrate import CalibrationSizes, measure

        print(f"calibrating this machine ({model.dtype}: the model's decoder layer, all-reduce between busy ranks, "
              f"GEMMs, memory copy, loopback link) ...", file=sys.stderr)
        tps = tuple(t for t in range(1, args.nodes * args.gpus_per_node + 1) if _tp_ok(model, t))
        data = measure(model.torch_dtype, CalibrationSizes(hidden=model.hidden_size), model, tps)
        if os.path.exists(path):  # keep the layer costs of other models measured on this machine
            try:
                data["layers"] = {**read_calibration(path).get("layers", {}), **data["layers"]}
            except ValueError:
                pass  # a malformed old file is replaced whole by the new measurements
        write_calibration(path, data)
    elif args.calibration_file is None and not os.path.exists(path):
        return stated
    return calibrated_cpu(path, read_calibration(path), model.dtype)


def _tp_ok(model, tp: int) -> bool:
    """Whether serve accepts this TP size for the model (only those get their layer costs measured)."""
    from pipeserve.engine.arg_utils import check_tensor_parallel

    try:
        check_tensor_parallel(model, tp)
    except ValueError:
        return False
    return True
