"""`python -m services.auth.worker`: auth's handlers, loops and outbox relay."""

from services.auth.service import build
from shared.process import worker_main

if __name__ == "__main__":
    worker_main(build)
