"""The one exception type the data layer raises for problems a user can fix."""


class DataError(Exception):
    """A dataset is missing, damaged, or cannot be fetched.

    The message is always a single line that names the file or URL involved and
    says what to do about it, so the command-line front end can print it as is
    instead of a traceback.
    """
