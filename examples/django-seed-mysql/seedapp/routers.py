class FollowerRouter:
    """The seed article's FailoverRouter without its connection test: reads to the
    follower, writes and migrations to default. Whether a replica can serve a read is
    Switchyard's question now, answered from its health checks, not one probe per read."""

    def db_for_read(self, model, **hints):
        return "follower"

    def db_for_write(self, model, **hints):
        return "default"

    def allow_relation(self, obj1, obj2, **hints):
        return True

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        return db == "default"
