"""The one exception type for user-facing problems.

The CLI prints its message on one line and exits non-zero; a traceback only with --debug.
A message names the file or tensor and what is wrong with it.
"""


class SurgeryError(Exception):
    """A problem with the user's input: bad file, incompatible shapes, unsupported family."""


class SurgeryWarning(UserWarning):
    """Something the user should know that does not stop the operation (a file not carried, NaN passed
    through). The CLI prints each as one ``warning:`` line on stderr."""
