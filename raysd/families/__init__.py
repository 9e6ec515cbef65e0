"""Model families. Each family is one module here, registered by ``@register``; one import line each."""

# registry: one line per family
import raysd.families.adacos_knn  # noqa: F401,E402
import raysd.families.conv_ae  # noqa: F401,E402
import raysd.families.dense_ae  # noqa: F401,E402
import raysd.families.group_made  # noqa: F401,E402
import raysd.families.id_classifier  # noqa: F401,E402
import raysd.families.masked_unet  # noqa: F401,E402
import raysd.families.svdd_ae  # noqa: F401,E402
import raysd.families.triplet  # noqa: F401,E402
import raysd.families.vae  # noqa: F401,E402
from raysd.families.base import REGISTRY, Family, create_family, get_family, register  # noqa: F401
