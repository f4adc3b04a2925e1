"""`python -m services.audit.worker`: audit's queue reader, notifier and outbox relay."""

from services.audit.service import build
from shared.process import worker_main

if __name__ == "__main__":
    worker_main(build)
