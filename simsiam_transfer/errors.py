"""Expected bad input: one clear line on stderr and exit status 2 (README, "Commands")."""


class UserError(Exception):
    """Bad input or usage the user can fix; the message names the file/key and the fix."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """A NaN/inf loss stopped training (pretraining or fine-tuning); the CLI exits 1 with its message."""
