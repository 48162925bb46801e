"""The one exception the data layer raises for anything wrong with a dataset's files or arrays."""


class DataError(ValueError):
    """A dataset could not be found, fetched, verified or parsed.

    The message is one line of complete sentences that names the file, what is wrong with it and how to
    supply a good one, so a command line can print it as it is, without a traceback.
    """
