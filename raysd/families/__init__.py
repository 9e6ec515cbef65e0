"""Model families. Each family is one module here, registered by ``@register``; one import line each."""

from raysd.families.base import REGISTRY, Family, get_family, register  # noqa: F401

# registry: one line per family
