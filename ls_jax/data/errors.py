"""The one error of the data pipeline."""


class DataError(ValueError):
    """Bad training data (missing file, malformed row, nothing to train on); one-line message."""
