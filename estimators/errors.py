"""Errors that the command line turns into exit code 2 with one clear message."""


class UserInputError(ValueError):
    """Bad input from the user (model spec, strategy, file, shape): exit code 2, no traceback."""


# the training budget (epochs) of every step that trains, shared by `apply` and `estimate` (tasks.train)
FINETUNE_EPOCHS = 5
