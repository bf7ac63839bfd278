"""Device presets for `pipeserve plan`, as data, and `--device-spec FILE` adding one.

Peak figures are the vendors' datasheet numbers (dense bf16, no sparsity). Link figures are per direction
(a ring all-reduce sends and receives at once on each link). The effective fractions turn a peak into what
one step achieves; they are stated defaults, except where a measurement of this project exists (H200:
results/gpu.md measured copy bandwidth and GEMM rate in one run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

DEFAULT_EFF_BW = 0.7  # share of the HBM bandwidth a decode step's weight and KV reads reach
DEFAULT_EFF_FLOPS = 0.6  # share of peak FLOP/s a prefill GEMM reaches
DEFAULT_EFF_LINK = 0.8  # share of a link's bandwidth a collective reaches
DEFAULT_HOST_MS = 0.75  # engine time per step outside the device (results/gpu.md: the 1B one-stream step
# took 1.34 ms where its bytes needed 0.59 ms; the smallest model bounds the fixed cost from above)


@dataclass(frozen=True)
class Device:
    """One device kind: what it holds, how fast it reads and computes, and its links inside a node."""

    name: str
    memory_gb: float  # capacity, 1e9 bytes (datasheet units)
    hbm_gbps: float  # memory bandwidth, GB/s
    bf16_tflops: float  # dense bf16 tensor throughput, TFLOP/s
    pcie_gbps: float  # per direction, GB/s
    nvlink_gbps: float  # per direction, GB/s; 0 where the device has none
    source: str
    eff_bw: float = DEFAULT_EFF_BW
    eff_flops: float = DEFAULT_EFF_FLOPS
    eff_link: float = DEFAULT_EFF_LINK
    host_ms: float = DEFAULT_HOST_MS
    eff_source: str = "stated defaults (not measured on this device)"
    # Measured by `--calibrate` (empty / 0 / "" for a preset): GEMM TFLOP/s by row count, the intra-node link's
    # latency per message, and the line naming the calibration file and its date.
    gemm_curve: tuple[tuple[int, float], ...] = ()
    link_latency_us: float = 0.0
    calibration: str = ""
    # Also from --calibrate: the CPUs the layout's processes share (0: one per device, as on GPUs), and the
    # model's decoder-layer costs by rank shape (cpu_steps.LayerCosts' fields, keyed by cpu_steps.shape_key).
    cores: int = 0
    layer_costs: dict = field(default_factory=dict, hash=False, compare=False)
    # and what one TP pair's all-reduce adds with that many rank processes busy: {busy ranks: ((message bytes,
    # microseconds), ...)} of wall time, and of each rank's CPU time
    allreduce_busy_us: dict = field(default_factory=dict, hash=False, compare=False)
    allreduce_cpu_us: dict = field(default_factory=dict, hash=False, compare=False)

    def link_gbps(self, kind: str) -> float:
        return self.nvlink_gbps if kind == "nvlink" else self.pcie_gbps

    def flops_per_s(self, rows: float) -> float:
        """Effective FLOP/s of a step's GEMMs with `rows` rows: the measured curve, linear between its points and
        flat beyond them, where one exists; else the peak times the efficiency fraction."""
        curve = self.gemm_curve
        if not curve:
            return self.bf16_tflops * 1e12 * self.eff_flops
        if rows <= curve[0][0]:
            return curve[0][1] * 1e12
        for (r0, t0), (r1, t1) in zip(curve[:-1], curve[1:], strict=True):
            if rows <= r1:
                return (t0 + (t1 - t0) * (rows - r0) / (r1 - r0)) * 1e12
        return curve[-1][1] * 1e12


_PCIE4, _PCIE5 = 32.0, 64.0  # PCIe Gen4 / Gen5 x16, per direction
PRESETS: dict[str, Device] = {d.name: d for d in (
    Device("L4", 24, 300, 121, _PCIE4, 0, "NVIDIA L4 Tensor Core GPU datasheet"),
    Device("A10G", 24, 600, 125, _PCIE4, 0, "NVIDIA A10 Tensor Core GPU datasheet (AWS G5's A10G: same memory)"),
    Device("A100-40GB", 40, 1555, 312, _PCIE4, 300, "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB)"),
    Device("A100-80GB", 80, 2039, 312, _PCIE4, 300, "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"),
    Device("H100", 80, 3350, 989, _PCIE5, 450, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    # Measured on one H200 (results/gpu.md): device-to-device copy 4,230 GB/s, bf16 GEMM 779 TFLOP/s. The
    # engine's one-stream decode steps reached 42-66% of the copy-bandwidth limit there (a sanity reference).
    Device("H200", 141, 4800, 989, _PCIE5, 450, "NVIDIA H200 Tensor Core GPU datasheet (SXM)",
           eff_bw=4230 / 4800, eff_flops=779 / 989,
           eff_source="measured in results/gpu.md: copy 4,230 GB/s, GEMM 779 TFLOP/s"),
    # One model process with one thread per "device": DESIGN.md's bf16 GEMM rate of one AVX-512-bf16 core;
    # memory, bandwidth and loopback link are stated figures for a small 2-core, 24 GiB machine.
    Device("cpu", 12, 20, 0.44, 5, 0, "DESIGN.md (one AVX-512-bf16 core); memory and links stated",
           eff_bw=1.0, eff_flops=1.0, host_ms=2.0, eff_source="stated figures for one core (not calibrated)"),
)}

_REQUIRED = ("name", "memory_gb", "hbm_gbps", "bf16_tflops", "pcie_gbps", "source")


def load_device_spec(path: str) -> Device:
    """A device from a JSON (or, where PyYAML is installed, YAML) file with Device's field names."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"device spec {path!r}: cannot read it ({exc.strerror})") from None
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise ValueError(f"device spec {path!r}: expected a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in fields(Device)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"device spec {path!r}: unknown field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"device spec {path!r}: missing field(s) {', '.join(missing)}")
    for key, value in data.items():
        if key in ("gemm_curve", "link_latency_us", "calibration", "cores", "layer_costs",
                   "allreduce_busy_us", "allreduce_cpu_us"):
            raise ValueError(f"device spec {path!r}: {key} comes from --calibrate, not from a device spec")
        if key in ("name", "source", "eff_source"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"device spec {path!r}: {key} must be a non-empty string")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"device spec {path!r}: {key} must be a number >= 0, got {value!r}")
    for key in ("memory_gb", "hbm_gbps", "bf16_tflops", "pcie_gbps"):
        if data[key] <= 0:
            raise ValueError(f"device spec {path!r}: {key} must be > 0, got {data[key]!r}")
    for key in ("eff_bw", "eff_flops", "eff_link"):
        if key in data and not 0 < data[key] <= 1:
            raise ValueError(f"device spec {path!r}: {key} must be in (0, 1], got {data[key]!r}")
    return Device(**data)


def _parse(path: str, text: str) -> object:
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"device spec {path!r}: YAML needs PyYAML, which is not installed; "
                             f"write the spec as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"device spec {path!r}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"device spec {path!r}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def resolve_device(name: str, spec_path: str | None) -> Device:
    """The preset called `name`, or the device a spec file describes (which must carry that name)."""
    devices = dict(PRESETS)
    if spec_path is not None:
        spec = load_device_spec(spec_path)
        devices[spec.name] = spec
    if name not in devices:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(devices)} (or add one with --device-spec FILE)")
    return devices[name]
