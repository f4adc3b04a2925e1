"""Every service's builder, by name: the one list the cross-service composition roots share."""

from services.audit.service import build as build_audit
from services.auth.service import build as build_auth
from services.autogrow.service import build as build_autogrow
from services.bakery.service import build as build_bakery
from services.pool.service import build as build_pool
from shared.process import ServiceBuilder

SERVICES: dict[str, ServiceBuilder] = {
    "auth": build_auth,
    "bakery": build_bakery,
    "pool": build_pool,
    "autogrow": build_autogrow,
    "audit": build_audit,
}
