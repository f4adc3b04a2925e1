"""`python -m services.bakery.worker`: bakery's handlers, loops and outbox relay."""

from services.bakery.service import build
from shared.process import worker_main

if __name__ == "__main__":
    worker_main(build)
