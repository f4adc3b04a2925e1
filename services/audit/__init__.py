"""audit: turns AWS security events into alerts that stay open until someone acknowledges them.

`rules` classifies what arrives on the security-event queue (deploy/cloudformation/audit.yaml);
`alerts` decides, with the clock passed in, when an open alert is notified, re-notified and
escalated. Both are pure: the queue reader, the tables, the API and the senders sit around them.
"""
