"""How much memory a sampling request needs, from a bundle's manifest and stage configs alone (no params
loaded), so the CLI can refuse a request that cannot fit before it loads the bundle or samples anything.

The estimate is deliberately simple and errs high:

- outputs (host memory), per row: every image stage's uint8 output (the pipeline keeps them all), the final
  image once more for the grid, and for the methods that invert an image the decoder-resolution float32
  noise; fixed: nothing worth counting.
- working set (accelerator memory; host memory on a CPU-only machine), per row of a batch, the largest over
  the image stages run: the UNet's float32 activations at that stage's resolution, i.e. the skip stack
  (`num_res_blocks + 1` maps per level, kept for the up path) twice over, plus 6 maps of the widest level for
  the tensors live inside a block, plus the self-attention maps (heads x pixels^2 per attention level) and
  the full-resolution blocks; doubled for the decoder, whose classifier-free guidance runs two rows per row.
- fixed on the same memory: every stage's params (num_params x dtype size).

Available memory is /proc/meminfo's MemAvailable (else the physical memory) and, on an accelerator, the
first device's `bytes_limit`; a request may use 90% of each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = float(1 << 30)
USABLE = 0.9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _unet_bytes_per_row(model: dict, resolution: int) -> int:
    """float32 activation bytes one row of a UNet at `resolution` keeps live (see the module doc)."""
    ch = int(model.get("channels", 64))
    mults = [int(m) for m in model.get("channel_mult", (1,))] or [1]
    blocks = int(model.get("num_res_blocks", 1))
    patch = max(1, int(model.get("patch_size", 1) or 1))
    head_ch = max(1, int(model.get("head_channels", 64) or 64))
    attn = {int(a) for a in (model.get("attention_resolutions") or ())}
    skip = widest = attention = 0
    for level, mult in enumerate(mults):
        side = max(1, resolution // (patch * 2 ** level))
        c = ch * mult
        skip += side * side * c * (blocks + 1)
        widest = max(widest, side * side * c)
        if side * patch in attn or side in attn:  # attention resolutions are feature-map sizes
            attention += max(1, c // head_ch) * (side * side) ** 2
    full = resolution * resolution * int(model.get("full_res_channels", 0) or 0) * 4
    return 4 * (2 * skip + 6 * widest + attention + full)


@dataclass
class MemoryPlan:
    """Bytes per row of outputs and of a batch's working set, fixed bytes, and what is available."""

    out_per_row: int
    work_per_row: int
    fixed: int
    host_available: int
    device_available: int | None  # None: the working set lives in host memory (CPU)

    def need(self, rows: int, batch: int) -> tuple[int, int]:
        """(host bytes, device bytes; 0 on CPU) for `rows` rows sampled `batch` at a time."""
        work = self.fixed + min(batch, rows) * self.work_per_row
        if self.device_available is None:
            return rows * self.out_per_row + work, 0
        return rows * self.out_per_row, work

    def fits(self, rows: int, batch: int) -> bool:
        host, dev = self.need(rows, batch)
        if host > USABLE * self.host_available:
            return False
        return self.device_available is None or dev <= USABLE * self.device_available

    def largest_batch(self, rows: int) -> int:
        """The largest batch (<= rows) that fits with `rows` outputs; 0 if none does."""
        lo, hi = 0, rows
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fits(rows, mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def largest_rows(self) -> int:
        """The most rows whose outputs fit with a batch of one."""
        lo, hi = 0, 1 << 40
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fits(mid, 1):
                lo = mid
            else:
                hi = mid - 1
        return lo


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo, else the physical memory (os.sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def device_available_bytes() -> int | None:
    """The first accelerator's memory limit; None on a CPU-only machine (or when it is not reported)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    limit = stats.get("bytes_limit")
    return int(limit) - int(stats.get("bytes_in_use", 0)) if limit else None


def plan(manifest: dict, configs: dict[str, dict], num_upsamplers: int | None, inverts: bool,
         host_available: int | None = None, device_available: int | None = -1) -> MemoryPlan:
    """The MemoryPlan of sampling through the decoder and the first `num_upsamplers` upsamplers (all when
    None) of a bundle, from its manifest and its stages' configs ({stage name: config dict}); `inverts`:
    the method DDIM-inverts an image (variations, interpolate, edit). device_available -1: measure it."""
    stages = [s for s in manifest["stages"] if s["kind"] in ("decoder", "upsampler")]
    decoder, ups = stages[0], stages[1:]
    run = [decoder] + ups[: len(ups) if num_upsamplers is None else num_upsamplers]
    out = work = 0
    for s in run:
        res = int(s["interface"]["resolution"])
        out += res * res * 3
        w = _unet_bytes_per_row(dict(configs[s["name"]].get("model", {})), res)
        work = max(work, 2 * w if s["kind"] == "decoder" else w)
    final = int(run[-1]["interface"]["resolution"])
    out += final * final * 3  # the grid
    if inverts:
        dec = int(decoder["interface"]["resolution"])
        out += dec * dec * 3 * 4
    fixed = 0
    for s in manifest["stages"]:
        for model in s.get("models", {}).values():
            fixed += int(model.get("num_params", 0)) * DTYPE_BYTES.get(model.get("dtype", "float32"), 4)
    return MemoryPlan(out, work, fixed, host_available_bytes() if host_available is None else host_available,
                      device_available_bytes() if device_available == -1 else device_available)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / (1 << 20):.0f} MiB"
