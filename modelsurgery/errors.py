"""The one exception type for user-facing problems.

The CLI prints its message on one line and exits non-zero; a traceback only with --debug.
A message names the file or tensor and what is wrong with it.
"""


class SurgeryError(Exception):
    """A problem with the user's input: bad file, incompatible shapes, unsupported family."""
