"""Fixtures shared by the unit tests of more than one folder."""

import pytest

from vq_tasks.restore import files


@pytest.fixture(
    params=[
        pytest.param(
            True,
            id="tarfile-filters",
            marks=pytest.mark.skipif(
                not files.FILTERS, reason="tarfile has no extraction filters before Python 3.11.4"
            ),
        ),
        pytest.param(False, id="own-checks"),
    ]
)
def extraction(request, monkeypatch):
    """Restore config and logs once with tarfile's extraction filters (Python 3.11.4+) and once
    with the checks restore/files.py makes itself where Python has none (3.11.0 to 3.11.3), on
    any Python. The value: whether the filters are used."""
    monkeypatch.setattr(files, "FILTERS", request.param)
    return request.param
