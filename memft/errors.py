"""Errors memft reports to the user as a sentence and exit code 2 (bad input) or 1 (failed run)."""


class UserError(Exception):
    """A mistake in what the user asked for: a bad recipe, a missing file, an impossible combination.

    The CLI prints the message (no traceback) and exits with code 2.
    """


class RecipeError(UserError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        header = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the recipe"
        super().__init__(header + "\n" + "\n".join(f"  - {p}" for p in problems))


class RunFailed(Exception):
    """The run started but could not finish (e.g. a NaN loss). The CLI prints it and exits with code 1."""
