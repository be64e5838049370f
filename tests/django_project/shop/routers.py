class PrimaryReplicaRouter:
    """Send reads to the read-only endpoint and everything else to the primary.

    `replica` goes through Switchyard's read-only endpoint (a standby when one
    is healthy), `default` through the read-write endpoint (the primary).
    """

    def db_for_read(self, model, **hints):
        return "replica"

    def db_for_write(self, model, **hints):
        return "default"

    def allow_relation(self, obj1, obj2, **hints):
        # Both aliases hold the same data, so relations between them are fine.
        return True

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        # A standby is read-only: the schema is only ever changed on the primary.
        return db == "default"
