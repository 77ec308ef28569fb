"""Dispatch tables from ``olmoe-spattn bench kernel`` results (``--write-dispatch``).

A bench result row names a shape ``(B, H, T, D)``, a pattern, a backend (``ours`` is the
Triton kernel, ``fa4`` FlashAttention-4 through ``backend="fa4"``), the partition length and
the measured forward and forward+backward milliseconds. Rows are grouped by the dispatch
key (pattern, head_dim, width bucket: :func:`olmoe_spattn.dispatch.band_width` rounded to
a power of two); per key and mode (``train`` = forward+backward, ``infer`` = forward) the
table names ``fa4`` only when FA4 ran every shape of the group and its summed time is
lower than the Triton kernel's, else ``triton``.

  olmoe-spattn bench kernel --write-dispatch                 # after the run, into the package
  olmoe-spattn bench kernel --dispatch-from kernel_bench.json --write-dispatch table.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..bands import DYNAMIC, PATTERNS, BandSpec
from . import TABLE_DIR, TABLE_FORMAT, band_width, gpu_slug, width_bucket

#: bench backend name -> dispatch choice
BENCH_NAMES = {"ours": "triton", "fa4": "fa4"}
MODE_FIELDS = {"train": "fwdbwd_ms", "infer": "fwd_ms"}


def _row_key(row: dict) -> tuple[str, int, int] | None:
    """(pattern, head_dim, width bucket) of a bench row, or None when it is not a band row."""
    if row.get("pattern") not in PATTERNS or row.get("backend") not in BENCH_NAMES:
        return None
    b, h, t, d = row["shape"]
    n = row.get("partition_len", t)
    n = DYNAMIC if n in (DYNAMIC, None) else int(n)
    if n != DYNAMIC and n < h:
        return None
    spec = BandSpec(row["pattern"], int(h), n)
    return row["pattern"], int(d), width_bucket(int(band_width(spec, int(t))))


def _ms(row: dict | None, field: str) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    value = row.get(field)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def table_from_results(data: dict, *, source: str = "") -> dict:
    """The dispatch table (a JSON-ready dict) of one bench run's results ``data``.

    Raises ``ValueError`` when the results hold no shape where both backends were measured
    or tried.
    """
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"bench results{' ' + source if source else ''} must be a JSON object with a list 'results'")
    groups: dict[tuple[str, int, int], dict[tuple, dict[str, dict]]] = {}
    for row in data["results"]:
        key = _row_key(row)
        if key is None:
            continue
        shape = tuple(row["shape"]) + (str(row.get("partition_len")),)
        groups.setdefault(key, {}).setdefault(shape, {})[BENCH_NAMES[row["backend"]]] = row
    entries = []
    for (pattern, head_dim, width), shapes in sorted(groups.items()):
        entry: dict = {"pattern": pattern, "head_dim": head_dim, "width": width}
        usable = {s: rows for s, rows in shapes.items() if "triton" in rows and "fa4" in rows}
        if not usable:
            continue
        for mode, field in MODE_FIELDS.items():
            times: dict[str, list[float]] = {"triton": [], "fa4": []}
            fa4_ran_all = True
            for rows in usable.values():
                t_ms, f_ms = _ms(rows["triton"], field), _ms(rows["fa4"], field)
                if f_ms is None and t_ms is not None:
                    fa4_ran_all = False
                for name, ms in (("triton", t_ms), ("fa4", f_ms)):
                    if ms is not None:
                        times[name].append(ms)
            total = {k: round(sum(v), 4) if v else None for k, v in times.items()}
            if not times["triton"]:
                choice = "fa4" if times["fa4"] else "triton"
            else:
                choice = "fa4" if fa4_ran_all and total["fa4"] < total["triton"] else "triton"
            entry[mode] = choice
            entry[f"{mode}_ms"] = total  # summed over the group's shapes; None: not measured
        entry["shapes"] = [list(s[:4]) for s in usable]
        entries.append(entry)
    if not entries:
        raise ValueError(
            f"bench results{' ' + source if source else ''} hold no shape measured with both the "
            "Triton kernel ('ours') and 'fa4'; run `olmoe-spattn bench kernel` where flash-attn-4 is installed"
        )
    return {
        "format": TABLE_FORMAT,
        "gpu": data.get("gpu", ""),
        "key": "pattern, head_dim, width = power of two nearest ceil(partition_len / n_heads) capped at "
        "the key length (dense: the key length); train = forward+backward, infer = forward",
        "measured": {
            "date": data.get("date"),
            "command": data.get("command"),
            "torch": data.get("torch"),
            "triton": data.get("triton"),
            "fa4": data.get("fa4"),
            "dtype": (data.get("settings") or {}).get("dtype"),
            "source": source,
        },
        "entries": entries,
    }


def write_table(data: dict, path: str | Path, *, source: str = "") -> Path:
    """Writes the dispatch table of ``data`` to ``path`` (``"auto"``: the package's table of that GPU)."""
    table = table_from_results(data, source=source)
    out = TABLE_DIR / f"{gpu_slug(table['gpu'])}.json" if str(path) == "auto" else Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_table(table))
    return out


def format_table(table: dict) -> str:
    """JSON text of a table: the header indented, one line per entry (readable diffs)."""
    head = json.dumps({k: v for k, v in table.items() if k != "entries"}, indent=1)
    lines = ",\n".join("  " + json.dumps(e) for e in table["entries"])
    return head[:-2] + ',\n "entries": [\n' + lines + "\n ]\n}\n"


# ---------------------------------------------------------------- bench kernel hook
def run_from_results(args: argparse.Namespace, log=print) -> int:
    """``--dispatch-from``: converts an earlier results file; returns the exit status."""
    source = Path(args.dispatch_from)
    try:
        data = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--dispatch-from {source}: cannot read bench results ({err})") from err
    out = write_table(data, args.write_dispatch or "auto", source=source.name)
    log(f"wrote dispatch table {out}")
    return 0


def after_run(args: argparse.Namespace, data: dict, log=print, *, results_name: str = "kernel_bench.json") -> None:
    """``--write-dispatch`` after a bench run: writes the table of ``data`` (saved as ``results_name``)."""
    if args.write_dispatch:
        out = write_table(data, args.write_dispatch, source=results_name)
        log(f"wrote dispatch table {out}")
