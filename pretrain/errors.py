"""Errors a user can cause and fix: the command line prints their message alone, no traceback."""


class UserError(Exception):
    """One sentence that names the thing at fault and what to do about it."""


class RecipeError(UserError):
    """A recipe or a command-line override that does not fit the schema in pretrain.config."""
