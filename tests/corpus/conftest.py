"""Print the corpus tallies (programs, rewrites, misses by kind, wrong rewrites) at the end of the session."""
from .judge import TALLIES


def pytest_terminal_summary(terminalreporter):
    for t in TALLIES.values():
        if t.counts["generated"]:
            terminalreporter.write_sep("-", f"longattn corpus: {t.front_end}")
            terminalreporter.write_line(t.summary())
