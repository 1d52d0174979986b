"""What both rewriters (FX and ONNX) share about verifying a site before rewriting it: the matched subgraph
and its replacement run on the same random inputs and must agree, or the site stays as it was."""
from __future__ import annotations

# The most attention scores a verification run may compute (about 256 MiB in float64): above it, at the
# sizes the graph allows, the site is left as it was and the report says so.
MAX_VERIFY_SCORES = 1 << 25


class RewriteRejected(Exception):
    """The site is left as it was; the message says why."""
