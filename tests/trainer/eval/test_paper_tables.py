"""Paper-layout tables: our figures beside the paper's (docs/architecture.md, "Paper figures"), "-" where none."""
import pytest

from trainer.eval.paper_tables import OCIM, ONE_TO_ELEVEN, match_column, normalise, paper_tables, protocol_table


def _m(hter, auc, dataset=""):
    return {"hter": hter, "auc": auc, "dataset": dataset}


def test_ocim_table_prints_paper_rows_beside_ours():
    results = {"M": _m(0.10, 0.90), "casia_mfsd": _m(0.20, 0.80), "idiap": _m(0.30, 0.70), "OULU-NPU": _m(0.40, 0.60)}
    md, data = protocol_table(OCIM, results)
    lines = md.splitlines()
    assert lines[2] == "| method | OCI->M | OMI->C | OCM->I | ICM->O | avg |"
    assert lines[4] == "| ours | 10.00/90.00 | 20.00/80.00 | 30.00/70.00 | 40.00/60.00 | 25.00/75.00 |"
    assert lines[5] == "| I-FAS (paper) | 0.32/99.88 | 0.04/99.99 | 3.22/98.48 | 1.74/99.66 | 1.33/99.50 |"
    assert lines[6] == "| FLIP (ICCV'23, paper) | 4.95/98.11 | 0.54/99.98 | 4.25/99.07 | 2.31/99.63 | 3.01/99.20 |"
    assert data["test_sets"] == {"M": "M", "C": "casia_mfsd", "I": "idiap", "O": "OULU-NPU"}
    assert data["rows"]["ours"]["avg"] == {"hter": pytest.approx(25.0), "auc": pytest.approx(75.0)}
    assert data["rows"]["I-FAS (paper)"]["O"] == {"hter": 1.74, "auc": 99.66}


def test_partial_ocim_says_how_many_columns_it_averages():
    md, _ = protocol_table(OCIM, {"held-out": _m(0.05, 0.95, dataset="MSU-MFSD")})  # matched by the dataset field
    assert "| ours (avg over 1 of 4) | 5.00/95.00 | - | - | - | 5.00/95.00 |" in md


def test_one_to_eleven_has_every_paper_figure_and_dashes_for_flip_columns():
    md, data = protocol_table(ONE_TO_ELEVEN, {"WMCA": _m(0.2, 0.8), "hifimask": _m(None, None)})
    lines = md.splitlines()
    assert len(lines[2].split("|")) - 2 == 13  # method + 11 datasets + avg
    ifas = next(ln for ln in lines if ln.startswith("| I-FAS (paper)"))
    assert ifas.endswith("| 20.07/89.17 | 11.30/93.71 |") and "1.11/99.88" in ifas and "28.23/77.17" in ifas
    flip = next(ln for ln in lines if ln.startswith("| FLIP"))
    assert flip == "| FLIP (ICCV'23, paper) | " + " | ".join(["-"] * 11) + " | 18.73/87.90 |"
    assert any(ln.startswith("| ViT-L (paper)") and ln.endswith("| 21.08/85.61 |") for ln in lines)
    assert any(ln.startswith("| ViTAF (paper)") and ln.endswith("| 23.85/82.82 |") for ln in lines)
    ours = lines[4]
    assert "| - |" in ours and "20.00/80.00" in ours  # HiFiMask had no figures (one-class set): "-"
    assert data["rows"]["I-FAS (paper)"]["avg"] == {"hter": 11.30, "auc": 93.71}


def test_aliases_and_auto_protocol():
    assert normalise("HKBU-MARs-V1+") == "hkbumarsv1" and normalise("msu_mfsd") == "msumfsd"
    assert match_column(OCIM, "domain_d") is None
    assert match_column(ONE_TO_ELEVEN, "nothing", "Rose-Youtu").key == "Rose-Youtu"
    md, data = paper_tables({"domain_d": _m(0.4, 0.6)})
    assert md == "" and data == {}  # the demo's domains map to no paper column
    md, data = paper_tables({"domain_d": _m(0.4, 0.6)}, "ocim")
    assert "| ours (avg over 0 of 4) | - | - | - | - | - |" in md and set(data) == {"ocim"}
    with pytest.raises(ValueError, match="unknown protocol"):
        paper_tables({}, "ocmi")
    with pytest.raises(ValueError, match="both map"):
        protocol_table(OCIM, {"msu": _m(0.1, 0.9), "M": _m(0.2, 0.8)})
