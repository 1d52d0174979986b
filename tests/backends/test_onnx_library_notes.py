"""The onnxruntime library's support matrix reaches a conversion's report through longattn.onnx, which passes it
to the rewriter (the rewriter does not import backends/)."""
import longattn.onnx as lo
from tests.patterns.test_onnx_spellings import SCALE, attention


def test_conversion_notes_the_linear_settings_the_library_runs_as_exact_attention():
    notes = {}
    for rule in ({"use": "linear", "update_rule": "delta"}, {"use": "linear"}):
        _, report = lo.convert(attention(SCALE), policy={"version": 1, "rules": [{"layers": "*", **rule}]})
        (site,) = report.sites
        assert site.status == "rewritten"
        notes[rule.get("update_rule", "add")] = site.notes
    assert notes == {"delta": ["the onnxruntime library runs linear (update_rule=delta) as exact attention"], "add": []}
