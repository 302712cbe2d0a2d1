"""The jobs' logging config (conf/hydra/job_logging/recompute_lab.yaml): recompute_lab's own INFO
lines reach the console, third-party INFO chatter (fontTools' glyph subsetting when matplotlib
writes a PDF, matplotlib's and PIL's lookups) does not, warnings from them still do."""

from __future__ import annotations

import io
import logging
import logging.config
from pathlib import Path

import yaml

from recompute_lab.config import CONF_DIR


def test_third_party_info_stays_out_of_the_console(tmp_path):
    path = Path(CONF_DIR) / "hydra" / "job_logging" / "recompute_lab.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["handlers"]["file"]["filename"] = str(tmp_path / "job.log")
    stream = io.StringIO()
    cfg["handlers"]["console"]["stream"] = stream
    saved = {n: logging.getLogger(n).level for n in ("fontTools", "matplotlib", "PIL", "")}
    root_handlers = list(logging.getLogger().handlers)
    # An earlier dictConfig of this test process (disable_existing_loggers=True) may have disabled
    # loggers that existed then; a job process configures logging once, with this file: test that.
    named = (
        "fontTools.subset",
        "matplotlib.font_manager",
        "PIL.PngImagePlugin",
        "recompute_lab.analysis",
    )
    disabled = {n: logging.getLogger(n).disabled for n in named}
    try:
        for n in named:
            logging.getLogger(n).disabled = False
        logging.config.dictConfig(cfg)
        logging.getLogger("fontTools.subset").info("maxp pruned")
        logging.getLogger("matplotlib.font_manager").info("findfont: scoring")
        logging.getLogger("PIL.PngImagePlugin").info("STREAM b'IHDR'")
        logging.getLogger("recompute_lab.analysis").info("wrote summary.md")
        logging.getLogger("fontTools.subset").warning("a glyph is missing")
        for h in logging.getLogger().handlers:
            h.flush()
    finally:
        for h in logging.getLogger().handlers:
            if h not in root_handlers:
                h.close()
        logging.getLogger().handlers[:] = root_handlers
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        for n, was in disabled.items():
            logging.getLogger(n).disabled = was
    out = stream.getvalue()
    assert "wrote summary.md" in out and "a glyph is missing" in out
    assert "maxp pruned" not in out and "findfont" not in out and "IHDR" not in out
