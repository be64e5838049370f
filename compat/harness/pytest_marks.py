"""pytest plugin (-p harness.pytest_marks): records each test's markers as a junit
property, so that compat/run can tell which failures the suite itself marks as timing
based (psycopg's `timing`, SQLAlchemy's `timing_intensive`)."""

WANTED = {"timing", "slow", "flakey", "timing_intensive"}


def pytest_collection_modifyitems(items):
    for item in items:
        names = sorted({m.name for m in item.iter_markers()} & WANTED)
        if names:
            item.user_properties.append(("markers", ",".join(names)))
