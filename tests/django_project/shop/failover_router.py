class FailoverRouter:
    """The router of the Django-on-MySQL article in ../shared/seeds: reads go to the
    follower (here the alias `replica`), writes and migrations to `default`.

    The article's router probes the follower with a socket before every read and
    falls back to `default` when it does not answer. Here `replica` is Switchyard's
    read-only endpoint, which does that itself: it serves reads from a healthy replica,
    and from the primary (still read-only) when no replica is left.
    """

    def db_for_read(self, model, **hints):
        return "replica"

    def db_for_write(self, model, **hints):
        "Point all writes to the default db"
        return "default"

    def allow_relation(self, obj1, obj2, **hints):
        # Both aliases hold the same data (Django's primary/replica example does this).
        return True

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        "Make sure only the default db allows migrations (the article's allow_syncdb)"
        return db == "default"
