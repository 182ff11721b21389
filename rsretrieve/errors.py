"""The exception types for bad input. Messages are one line: '<file>: <problem>'."""


class RSRetrieveError(Exception):
    """Bad input or state the user can fix. The CLI prints the message and exits 1."""


class DataError(RSRetrieveError):
    """Unreadable or invalid input data (GeoTIFF, parquet, LMDB, query tile)."""


class ModalityAbsent(DataError):
    """A dataset root holds none of one modality (e.g. only Major TOM's Core-S2L2A was downloaded).
    A command asked for both modalities encodes the other and says so; asked for this one, it fails."""


class CheckpointError(RSRetrieveError):
    """A checkpoint that cannot be read or does not match its config."""


class StoreError(RSRetrieveError):
    """An embedding store or index that is missing or does not match what is asked."""


def located(path: object, problem: str) -> str:
    """The one-line message format used across the project."""
    return f"{path}: {problem}"
