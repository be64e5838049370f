"""What a small app does all day: write a note, read notes back, every 50 ms. Prints a
line per second, and at the end whether the app was serving after the fault: its last
three seconds without an error."""
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from notes.models import Note


class Command(BaseCommand):
    help = "Write and read notes for --seconds, then say whether the app kept serving."

    def add_arguments(self, parser):
        parser.add_argument("--seconds", type=float, default=30)
        parser.add_argument("--wait-only", action="store_true",
                            help="only wait until reads find the table, then exit")

    def handle(self, *args, seconds, wait_only, **options):
        read_alias = getattr(settings, "READ_ALIAS", "default")
        # The table the migration made must have reached the replicas before reads go
        # there (a fresh cluster's replicas may be seconds behind).
        deadline = time.monotonic() + 60
        while True:
            try:
                Note.objects.using(read_alias).exists()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                connections[read_alias].close()
                time.sleep(0.2)
        if wait_only:
            return
        start = time.monotonic()
        last_error_at, errors, writes, reads, second = None, [], 0, 0, 0
        slowest = ("", 0.0)
        while (now := time.monotonic() - start) < seconds:
            t0 = time.monotonic()
            try:
                Note.objects.create(text=f"note at {now:.2f} s")
                writes += 1
                Note.objects.using(read_alias).order_by("-id")[:5].count()
                reads += 1
            except Exception as e:  # what a view would turn into a 500
                errors.append(f"{now:.1f} s: {type(e).__name__}: {str(e).splitlines()[0]}")
                last_error_at = now
                for conn in connections.all():
                    conn.close_if_unusable_or_obsolete()
            if time.monotonic() - t0 > slowest[1]:
                slowest = (f"{now:.1f} s", time.monotonic() - t0)
            if int(now) > second:
                second = int(now)
                self.stdout.write(f"[{second:3d} s] writes {writes}, reads {reads}, errors {len(errors)}")
            time.sleep(0.05)
        self.stdout.write(f"done: {writes} writes and {reads} reads served, {len(errors)} errors; "
                          f"the slowest write and read took {slowest[1]:.2f} s (at {slowest[0]})")
        for e in errors[:5]:
            self.stdout.write(f"  error at {e}")
        if last_error_at is not None and seconds - last_error_at < 3:
            raise CommandError("the app was still failing in its last 3 seconds")
        self.stdout.write("ok: the app kept serving")
