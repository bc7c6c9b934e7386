"""Result tables in the paper's layouts, with the paper's published figures printed beside ours.

Two protocols (docs/architecture.md, "Paper figures"): OCIM leave-one-out (columns M, C, I, O + average; each
column is a different model, trained on the other three) and One to Eleven (11 test sets +
average, one model trained on CelebA-Spoof). A test set lands in a column when its name (the
shard-set directory, or ``NAME=PATH`` on the ifas-eval command line) or its samples' ``dataset``
field matches one of the column's aliases. A figure the paper does not give (the paper has FLIP
only as an average for One to Eleven) prints as "-".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

Pair = tuple[float, float]  # (HTER %, AUC %)


@dataclass(frozen=True)
class Column:
    key: str  # short name used in JSON
    title: str  # header in the paper's table
    aliases: tuple[str, ...]  # normalised names (lowercase alphanumerics) that map to this column


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    columns: tuple[Column, ...]
    paper: Mapping[str, Mapping[str, Pair]]  # method -> column key (or "avg") -> (HTER, AUC)


OCIM = Protocol(
    name="ocim",
    title="OCIM leave-one-out (HTER % / AUC %)",
    columns=(
        Column("M", "OCI->M", ("m", "msu", "msumfsd")),
        Column("C", "OMI->C", ("c", "casia", "casiamfsd", "casiafasd")),
        Column("I", "OCM->I", ("i", "idiap", "replay", "replayattack", "idiapreplayattack")),
        Column("O", "ICM->O", ("o", "oulu", "oulunpu")),
    ),
    paper={
        "I-FAS (paper)": {
            "M": (0.32, 99.88),
            "C": (0.04, 99.99),
            "I": (3.22, 98.48),
            "O": (1.74, 99.66),
            "avg": (1.33, 99.50),
        },
        "FLIP (ICCV'23, paper)": {
            "M": (4.95, 98.11),
            "C": (0.54, 99.98),
            "I": (4.25, 99.07),
            "O": (2.31, 99.63),
            "avg": (3.01, 99.20),
        },
    },
)

ONE_TO_ELEVEN = Protocol(
    name="one_to_eleven",
    title="One to Eleven: trained on CelebA-Spoof (HTER % / AUC %)",
    columns=(
        Column("CASIA-MFSD", "CASIA-MFSD", ("casiamfsd", "casia", "casiafasd")),
        Column("CASIA-SURF-3DMask", "3DMask", ("casiasurf3dmask", "surf3dmask", "3dmask")),
        Column("HKBU-MARs-V1+", "HKBU", ("hkbumarsv1", "hkbumarsv1plus", "hkbumars", "hkbu")),
        Column("HiFiMask", "HiFiMask", ("hifimask",)),
        Column("MSU-MFSD", "MSU", ("msumfsd", "msu")),
        Column("OULU-NPU", "OULU", ("oulunpu", "oulu")),
        Column("Replay-Attack", "Replay", ("replayattack", "idiap", "replay", "idiapreplayattack")),
        Column("Rose-Youtu", "Rose-Youtu", ("roseyoutu", "rose")),
        Column("SiW", "SiW", ("siw",)),
        Column("SiW-M-V2", "SiW-M-V2", ("siwmv2", "siwm")),
        Column("WMCA", "WMCA", ("wmca",)),
    ),
    paper={
        "I-FAS (paper)": {
            "CASIA-MFSD": (1.11, 99.88),
            "CASIA-SURF-3DMask": (6.18, 98.40),
            "HKBU-MARs-V1+": (18.64, 88.77),
            "HiFiMask": (28.23, 77.17),
            "MSU-MFSD": (5.63, 98.73),
            "OULU-NPU": (14.86, 91.68),
            "Replay-Attack": (9.15, 95.12),
            "Rose-Youtu": (5.52, 98.48),
            "SiW": (4.02, 98.34),
            "SiW-M-V2": (10.89, 95.02),
            "WMCA": (20.07, 89.17),
            "avg": (11.30, 93.71),
        },
        "FLIP (ICCV'23, paper)": {"avg": (18.73, 87.90)},
        "ViT-L (paper)": {"avg": (21.08, 85.61)},
        "ViTAF (paper)": {"avg": (23.85, 82.82)},
    },
)

PROTOCOLS = {p.name: p for p in (OCIM, ONE_TO_ELEVEN)}


def normalise(name: str) -> str:
    """'MSU-MFSD', 'msu_mfsd' and 'MSU MFSD' all become 'msumfsd' (every character but a-z and 0-9 goes)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def match_column(protocol: Protocol, *names: str) -> Column | None:
    """The first column any of ``names`` (set name, dataset field) is an alias of."""
    for name in names:
        n = normalise(name)
        for col in protocol.columns:
            if n in col.aliases:
                return col
    return None


def place(protocol: Protocol, results: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, Pair]]:
    """Column key -> (test set name, (HTER %, AUC %)) for the test sets that map to a column.

    ``results`` maps a test set name to its metrics dict (``hter``, ``auc`` as fractions, optional
    ``dataset``). Two sets in one column is ambiguous and refused.
    """
    placed: dict[str, tuple[str, Pair]] = {}
    for name, m in results.items():
        col = match_column(protocol, name, str(m.get("dataset") or ""))
        if col is None:
            continue
        if col.key in placed:
            raise ValueError(
                f"test sets {placed[col.key][0]!r} and {name!r} both map to the {protocol.name} column "
                f"{col.key!r}; name them NAME=PATH on the command line to tell them apart"
            )
        placed[col.key] = (name, (_pct(m.get("hter")), _pct(m.get("auc"))))
    return placed


def _pct(x: float | None) -> float:
    return math.nan if x is None else 100.0 * float(x)


def _fmt(pair: Pair | None) -> str:
    if pair is None or any(v is None or math.isnan(v) for v in pair):
        return "-"
    return f"{pair[0]:.2f}/{pair[1]:.2f}"


def protocol_table(
    protocol: Protocol, results: Mapping[str, Mapping[str, Any]], label: str = "ours"
) -> tuple[str, dict[str, Any]]:
    """(Markdown, JSON-ready dict) of ``protocol`` with our row first and the paper's rows below.

    Our average is over the columns we have; when some are missing the row label says how many,
    since an average over fewer test sets does not compare with the paper's.
    """
    placed = place(protocol, results)
    ours = {key: pair for key, (_, pair) in placed.items()}
    n = len(protocol.columns)
    if ours:
        ours["avg"] = (float(np.mean([p[0] for p in ours.values()])), float(np.mean([p[1] for p in ours.values()])))
    row_label = label if len(placed) == n else f"{label} (avg over {len(placed)} of {n})"
    header = "| method | " + " | ".join(c.title for c in protocol.columns) + " | avg |"
    lines = [f"**{protocol.title}**", "", header, "|---" * (n + 2) + "|"]
    rows = {row_label: ours, **{k: dict(v) for k, v in protocol.paper.items()}}
    for method, figures in rows.items():
        cells = [_fmt(figures.get(c.key)) for c in protocol.columns] + [_fmt(figures.get("avg"))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    data = {
        "protocol": protocol.name,
        "columns": [c.key for c in protocol.columns] + ["avg"],
        "test_sets": {key: name for key, (name, _) in placed.items()},
        "rows": {
            method: {k: {"hter": v[0], "auc": v[1]} for k, v in figures.items()} for method, figures in rows.items()
        },
    }
    return "\n".join(lines), data


def paper_tables(results: Mapping[str, Mapping[str, Any]], protocol: str = "auto") -> tuple[str, dict[str, Any]]:
    """The protocol tables for ``results``: ``auto`` renders each protocol any test set maps to;
    a protocol name renders that one even when empty (every column "-" on our row)."""
    if protocol != "auto" and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use auto, {', '.join(PROTOCOLS)}")
    chosen = [PROTOCOLS[protocol]] if protocol != "auto" else [p for p in PROTOCOLS.values() if place(p, results)]
    parts, data = [], {}
    for p in chosen:
        md, js = protocol_table(p, results)
        parts.append(md)
        data[p.name] = js
    return "\n\n".join(parts), data
