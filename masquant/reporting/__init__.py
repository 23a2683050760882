from masquant.reporting.table import collect_results, format_markdown, results_frame

__all__ = ["collect_results", "results_frame", "format_markdown"]
