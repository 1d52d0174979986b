"""`longattn policy check p.yaml`: validate a policy file and summarise its rules."""
from __future__ import annotations


def cmd_policy_check(args) -> int:
    from ..rewriter.policy import check_policy_file
    print(check_policy_file(args.path))
    return 0


def add_parser(sub) -> None:
    pol = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command", required=True)
    c = pol.add_parser("check", help="validate a policy file and summarise its rules")
    c.add_argument("path")
    c.set_defaults(run=cmd_policy_check)
