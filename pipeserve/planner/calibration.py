"""The calibration file `--calibrate` writes and later `--gpu cpu` plans read: measured rates replace the `cpu`
preset's stated figures, with efficiency fractions of 1.0 (a measured rate is already an effective one)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from pipeserve.planner.hardware import PRESETS, Device

DEFAULT_PATH = "~/.cache/pipeserve/calibration-cpu.json"
_NUMBERS = ("copy_gbps", "link_gbps", "link_latency_us")
_STRINGS = ("cpu_model", "torch", "measured", "dtype")


def default_path() -> str:
    return os.path.expanduser(DEFAULT_PATH)


def write_calibration(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except OSError as exc:
        raise ValueError(f"calibration file {path!r}: cannot write it ({exc.strerror})") from None


def read_calibration(path: str) -> dict:
    """The file's fields, checked; ValueError naming the file and the first thing wrong with it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"calibration file {path!r}: cannot read it ({exc.strerror}); "
                         f"write one with --calibrate") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"calibration file {path!r}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                         f"write it again with --calibrate") from None
    if not isinstance(data, dict):
        raise ValueError(f"calibration file {path!r}: expected a JSON object, got {type(data).__name__}")
    for key in _NUMBERS:
        value = data.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"calibration file {path!r}: {key} must be a number > 0, got {value!r}")
    for key in _STRINGS:
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"calibration file {path!r}: {key} must be a non-empty string, got {data.get(key)!r}")
    curve = data.get("gemm_tflops")
    ok = isinstance(curve, list) and curve and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and p[0] >= 1
        and isinstance(p[1], (int, float)) and p[1] > 0 for p in curve)
    if not ok or [p[0] for p in curve] != sorted({p[0] for p in curve}):
        raise ValueError(f"calibration file {path!r}: gemm_tflops must be a list of [rows, TFLOP/s] pairs "
                         f"with increasing rows >= 1 and rates > 0, got {curve!r}")
    layers = data.get("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(v, dict) and {"base", "head"} <= set(v)
                                               for v in layers.values()):
        raise ValueError(f"calibration file {path!r}: layers must map rank shapes to measured costs; "
                         f"write it again with --calibrate")
    for key in ("allreduce_busy_us", "allreduce_cpu_us"):
        if not _is_allreduce_table(data.get(key, {})):
            raise ValueError(f"calibration file {path!r}: {key} must map busy ranks to [[message bytes, "
                             f"microseconds], ...] with increasing bytes; write it again with --calibrate")
    cores = data.get("cores", 0)
    if not isinstance(cores, int) or cores < 0:
        raise ValueError(f"calibration file {path!r}: cores must be an integer >= 0, got {cores!r}")
    return data


def _is_allreduce_table(table) -> bool:
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0

    def points(v) -> bool:
        return (isinstance(v, list) and len(v) > 0
                and all(isinstance(p, list) and len(p) == 2 and number(p[0]) and number(p[1]) for p in v)
                and [p[0] for p in v] == sorted({p[0] for p in v}))

    return isinstance(table, dict) and all(isinstance(k, str) and k.isdigit() and points(v) for k, v in table.items())


def _allreduce(table: dict) -> dict[int, tuple[tuple[float, float], ...]]:
    return {int(k): tuple((float(b), float(us)) for b, us in v) for k, v in table.items()}


def calibrated_cpu(path: str, data: dict, plan_dtype: str) -> Device:
    """The `cpu` preset with the file's measured figures; the plan's dtype (its name) must be the one measured."""
    if data["dtype"] != plan_dtype:
        raise ValueError(f"calibration file {path!r} measured {data['dtype']} GEMMs, the plan uses {plan_dtype}: "
                         f"run --calibrate with --dtype {plan_dtype}, or plan with --dtype {data['dtype']}")
    curve = tuple((int(r), float(t)) for r, t in data["gemm_tflops"])
    return replace(
        PRESETS["cpu"], hbm_gbps=data["copy_gbps"], bf16_tflops=curve[-1][1], pcie_gbps=data["link_gbps"],
        eff_bw=1.0, eff_flops=1.0, gemm_curve=curve, link_latency_us=data["link_latency_us"],
        cores=data.get("cores", 0), layer_costs=data.get("layers", {}),
        allreduce_busy_us=_allreduce(data.get("allreduce_busy_us", {})),
        allreduce_cpu_us=_allreduce(data.get("allreduce_cpu_us", {})),
        source=f"{data['cpu_model']}, torch {data['torch']}, {data.get('threads', '?')} thread(s)",
        eff_source="calibrated: measured rates are already effective",
        calibration=f"calibrated figures from {path} (measured {data['measured']})")
