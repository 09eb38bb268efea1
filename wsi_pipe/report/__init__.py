"""`wsi-pipe report`: one HTML page (plain HTML + CSS, no JavaScript) of whatever a run holds."""

from wsi_pipe.report.builder import ReportResult, build_report

__all__ = ["ReportResult", "build_report"]
