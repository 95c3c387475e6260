"""`fusechat report`: one self-contained HTML page (`<run dir>/report.html`) showing what a fusion run did, built
from the versions on disk only, so it can be written on another machine than the training.

- `read`: manifests, stats.json, Parquet and the trainers' logs in, plain numbers and arrays out;
- `plots`: numbers in, matplotlib figures out;
- `page`: the sections and the page (`write_report`).
"""

from fusechat.report.page import report_after_run, write_report

__all__ = ["report_after_run", "write_report"]
