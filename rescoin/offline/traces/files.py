"""Finding, sniffing and reading trace files; every pandas, gzip or I/O failure becomes a
:class:`TraceError` naming the file (and line)."""
from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from rescoin.offline.traces.model import (
    TraceError,
)


def check_selection(vms: int | None, vm_offset: int, days: float | None, start_day: float) -> None:
    if vms is not None and vms < 1:
        raise TraceError(f"vms must be at least 1, got {vms}")
    if vm_offset < 0:
        raise TraceError(f"vm_offset must be 0 or more, got {vm_offset}")
    if days is not None and not days > 0:
        raise TraceError(f"days must be positive, got {days}")
    if not start_day >= 0:
        raise TraceError(f"start_day must be 0 or more, got {start_day}")


def existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise TraceError(f"{p}: no such file or directory; give the path of a trace directory")
    return p


def pick(ids: list[str], vms: int | None, vm_offset: int, where: Path) -> list[str]:
    """The ``vms`` ids after ``vm_offset``, or a clear error if there are too few."""
    if vm_offset >= len(ids) or (vms is not None and vm_offset + vms > len(ids)):
        want = f"{vms} VMs" if vms is not None else "VMs"
        raise TraceError(
            f"{where}: asked for {want} after skipping {vm_offset}, but the trace has only "
            f"{len(ids)} VMs; lower --vms or --vm-offset"
        )
    return ids[vm_offset : None if vms is None else vm_offset + vms]


# --------------------------------------------------------------------------- files


def natural_key(name: str) -> tuple:
    """Sort key putting 'vm2' before 'vm10' and numeric ids in numeric order."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def visible(p: Path) -> bool:
    return not p.name.startswith(".")


def is_csv(p: Path) -> bool:
    n = p.name.lower()
    return p.is_file() and visible(p) and (n.endswith(".csv") or n.endswith(".csv.gz"))


def stem(p: Path) -> str:
    n = p.name
    for suffix in (".csv.gz", ".csv", ".gz"):
        if n.lower().endswith(suffix):
            return n[: -len(suffix)]
    return n


def csv_files(root: Path, depth: int = 2) -> list[Path]:
    """CSV files in ``root`` and up to ``depth`` folder levels below, shallow ones first."""
    found: list[Path] = []
    level = [root]
    for _ in range(depth + 1):
        subdirs: list[Path] = []
        for d in level:
            entries = sorted(d.iterdir(), key=lambda e: natural_key(e.name))
            found += [e for e in entries if is_csv(e)]
            subdirs += [e for e in entries if e.is_dir() and visible(e)]
        level = subdirs
    return found


def open_text(p: Path) -> IO[str]:
    """Open a possibly gzip-compressed text file."""
    if p.name.lower().endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8", newline="")
    return open(p, encoding="utf-8", newline="")


def read_first_line(p: Path) -> str:
    try:
        with open_text(p) as f:
            return f.readline()
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise TraceError(f"{p}: not a valid gzip file (truncated?)") from None
    except UnicodeDecodeError:
        raise TraceError(f"{p}: not a text file") from None
    except OSError as e:
        raise TraceError(f"{p}: cannot read: {e.strerror or e}") from None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def sniff_file(p: Path) -> str | None:
    """Format of one CSV file from its first line, or None if it is neither."""
    if not is_csv(p) or stem(p).lower().startswith("vmtable"):
        return None
    line = read_first_line(p)
    if ";" in line and "timestamp" in line.lower():
        return "bitbrains"
    fields = [f.strip() for f in line.split(",")]
    if len(fields) == 5 and _is_number(fields[0]) and fields[1] and all(map(_is_number, fields[2:])):
        return "azure"
    return None


def csv_error(p: Path, e: Exception) -> TraceError:
    """Turn a pandas/gzip/IO exception into a TraceError naming the file (and line)."""
    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
        return TraceError(f"{p}: not a valid gzip file (truncated?)")
    if isinstance(e, pd.errors.EmptyDataError):
        return TraceError(f"{p}: empty file; expected a header line and rows")
    if isinstance(e, pd.errors.ParserError):
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m:
            return TraceError(f"{p}:{m[2]}: expected {m[1]} fields, saw {m[3]}")
        return TraceError(f"{p}: cannot parse: {str(e).strip()}")
    if isinstance(e, UnicodeDecodeError):
        return TraceError(f"{p}: not a text file")
    if isinstance(e, OSError):
        return TraceError(f"{p}: cannot read: {e.strerror or e}")
    return TraceError(f"{p}: cannot read: {e}")


READ_ERRORS = (
    EOFError, zlib.error, OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError
)


def read_csv(p: Path, **kw) -> pd.DataFrame:
    try:
        return pd.read_csv(p, engine="c", skip_blank_lines=False, **kw)
    except READ_ERRORS as e:
        raise csv_error(p, e) from None


def iter_csv(p: Path, chunksize: int, **kw) -> Iterator[pd.DataFrame]:
    """Chunks of a big CSV; errors raised mid-file are translated too."""
    try:
        with pd.read_csv(p, engine="c", skip_blank_lines=False, chunksize=chunksize, **kw) as reader:
            yield from reader
    except READ_ERRORS as e:
        raise csv_error(p, e) from None


def numeric(df: pd.DataFrame, col, p: Path, first_line: int, label: str | None = None) -> np.ndarray:
    """Column as float64; a non-number raises TraceError with its file line."""
    s = df[col]
    if pd.api.types.is_numeric_dtype(s):
        return s.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)  # writable (copy-on-write)
    num = pd.to_numeric(s, errors="coerce")
    bad = np.flatnonzero(num.isna().to_numpy() & s.notna().to_numpy())
    if bad.size:
        i = int(bad[0])
        name = label if label is not None else col
        value = str(s.iloc[i]).strip()
        raise TraceError(f"{p}:{first_line + i}: {value!r} is not a number in column {name!r}")
    return num.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)


def clip_negative(values: np.ndarray) -> int:
    """Set negative samples to 0 in place; returns how many there were."""
    neg = values < 0
    n = int(neg.sum())
    values[neg] = 0.0
    return n

