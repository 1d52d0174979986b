"""The error a subcommand raises for a mistake on the command line: `main` prints it and exits 2, no traceback."""


class CliError(Exception):
    pass
