"""XML from untrusted files (OVF, Hyper-V configuration): parsed with no DTD and no entity anywhere.

defusedxml refuses a DOCTYPE, an entity declaration or an external reference wherever it is in
the document (a look at the first bytes does not: a declaration can follow megabytes of
comments), so neither entity expansion ("billion laughs") nor an external file can be reached.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import defusedxml.ElementTree as DET
from defusedxml.common import DefusedXmlException

from h2k.errors import InputError


def parse_untrusted(text: str, where: str, what: str) -> ET.Element:
    """The root element; InputError naming ``where`` for a DTD/entity or malformed XML."""
    try:
        return DET.fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException:
        raise InputError(f"{where}: refusing {what} with a DOCTYPE or entity declarations") from None
    except ET.ParseError as exc:
        raise InputError(f"{where}: not well-formed {what} ({exc})") from None
