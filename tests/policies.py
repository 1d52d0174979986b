"""Policies shared by the tests."""
from longattn.rewriter.policy import Policy

ALL_FLASH = Policy.from_dict({"version": 1, "rules": [{"layers": "*", "use": "flash"}]}, source="all-flash")
