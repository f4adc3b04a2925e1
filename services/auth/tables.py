"""auth's own tables."""

from shared.outbox import mailbox_tables

MAILBOX = mailbox_tables("auth")
